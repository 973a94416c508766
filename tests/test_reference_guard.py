"""Stale reference guard (issue 9 item 5): precomputed reference columns are spot-checked against the
reference model at start; columns from another model stop training with one clear message, unless the
check is switched off on purpose."""
import copy
import json

import pytest

from fastpref.cli import main
from fastpref.hf import load_preferences
from fastpref.models import tiny_model, tiny_tokenizer
from fastpref.train import Trainer, TrainConfig, demo_data_path
from fastpref.train.trainer import ReferenceMismatch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(open(demo_data_path()).read().splitlines(), vocab_size=600)


def model_of(tok, seed):
    model, _ = tiny_model("llama", tokenizer=tok, seed=seed, hidden_size=48, num_layers=2)
    return model


def config(**kw):
    base = dict(learning_rate=1e-3, batch_size=4, max_steps=1, progress=False, eval_batch_size=8,
                precision="fp32", reference="precomputed")
    base.update(kw)
    return TrainConfig(**base)


def columns_from(model, tok, n=8):
    """The data with reference columns computed by ``model`` (what a user caches)."""
    data = load_preferences(demo_data_path(), tok)
    data.examples = data.examples[:n]
    Trainer(copy.deepcopy(model), data, config(reference="precompute"), pad_token_id=tok.pad_token_id,
            log=None).precompute_reference()
    return data


@pytest.mark.parametrize("share_prompt", [True, False])
def test_matching_columns_train(tok, share_prompt):
    model = model_of(tok, 0)
    data = columns_from(model, tok)
    said = []
    trainer = Trainer(model, data, config(share_prompt=share_prompt), pad_token_id=tok.pad_token_id, log=said.append)
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert any("spot-checked" in line for line in said)


def test_columns_of_another_model_are_refused(tok):
    stale = columns_from(model_of(tok, 1), tok)
    trainer = Trainer(model_of(tok, 0), stale, config(), pad_token_id=tok.pad_token_id, log=None)
    with pytest.raises(ReferenceMismatch, match="do not match the reference model.*--no-check-reference"):
        trainer.train()
    assert trainer.step == 0  # refused before any update


def test_check_can_be_switched_off(tok):
    stale = columns_from(model_of(tok, 1), tok)
    trainer = Trainer(model_of(tok, 0), stale, config(check_reference=False), pad_token_id=tok.pad_token_id, log=None)
    history = trainer.train()
    assert abs(history[0]["loss"] - 0.6931472) > 1e-3  # the stale columns are used as they are


def test_cli_refuses_stale_columns_in_one_line(tmp_path, capsys):
    rows = [json.loads(line) for line in open(demo_data_path()) if line.strip()][:8]
    for r in rows:  # columns no model gives
        r["ref_chosen_logps"], r["ref_rejected_logps"] = -1.0, -2.0
    path = tmp_path / "stale.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--data", str(path), "--model", "tiny", "--max-steps", "1", "--batch-size", "4",
            "--output-dir", str(tmp_path / "out"), "--reference", "precomputed", "--precision", "fp32",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastpref train: precomputed reference log-probs do not match")
