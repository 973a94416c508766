"""The training loop on a tiny random Llama: fused and naive log-probs give the same loss curve (fp32,
|diff| <= 1e-5 per step over five AdamW steps), gradient accumulation, exact checkpoint resume, every
reference mode, point-wise and reference-free losses, and the ``fastpref train`` command."""
import copy
import json

import pytest
import torch

from fastpref.hf import load_preferences
from fastpref.models import tiny_model, tiny_tokenizer
from fastpref.train import Trainer, TrainConfig, demo_data_path, latest_checkpoint, lr_lambda

CURVE_TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(open(demo_data_path()).read().splitlines(), vocab_size=600)


@pytest.fixture(scope="module")
def base_model(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=0, hidden_size=48, num_layers=2)
    return model


def paired(tok, n=24):
    data = load_preferences(demo_data_path(), tok)
    data.examples = data.examples[:n]
    return data


def fresh(model):
    return copy.deepcopy(model)


def config(**kw):
    base = dict(learning_rate=1e-3, batch_size=4, max_steps=5, progress=False, eval_batch_size=8, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_fused_and_naive_give_the_same_loss_curve(tok, base_model):
    data = paired(tok)
    curves = {}
    for mode in ("fused", "naive"):
        model = fresh(base_model)
        trainer = Trainer(model, copy.deepcopy(data), config(logps=mode), pad_token_id=tok.pad_token_id, log=None)
        history = trainer.train()
        curves[mode] = [r["loss"] for r in history]
        assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in history)
    assert len(curves["fused"]) == 5
    assert curves["fused"][0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1
    assert curves["fused"][-1] < curves["fused"][0]
    worst = max(abs(a - b) for a, b in zip(curves["fused"], curves["naive"]))
    assert worst <= CURVE_TOL, f"loss curves differ by {worst:.3g}: {curves}"


def capture_grads(trainer):
    """Record the gradients the optimizer sees at every step (AdamW's update itself hides their scale)."""
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.detach().clone() for p in trainer.params]))
    return seen


def test_packed_batches_train_like_padded_ones(tok, base_model):
    """Padding-free packing (position ids restart per sequence; SDPA gets a block-diagonal mask on CPU)."""
    data = paired(tok, 8)
    curves = {}
    for packing in (False, True):
        trainer = Trainer(fresh(base_model), copy.deepcopy(data), config(max_steps=3, packing=packing),
                          pad_token_id=tok.pad_token_id, log=None)
        curves[packing] = [r["loss"] for r in trainer.train()]
        assert trainer.collator.packed == packing
    assert curves[True] == pytest.approx(curves[False], abs=CURVE_TOL)


def test_gradient_accumulation_matches_the_full_batch(tok, base_model):
    data = paired(tok, 8)
    out = {}
    for bs, accum in ((4, 1), (2, 2)):
        trainer = Trainer(fresh(base_model), copy.deepcopy(data), config(batch_size=bs, grad_accum=accum, max_steps=2),
                          pad_token_id=tok.pad_token_id, log=None)
        grads = capture_grads(trainer)
        out[(bs, accum)] = ([r["loss"] for r in trainer.train()], grads)
    (l1, g1), (l2, g2) = out[(4, 1)], out[(2, 2)]
    assert l1 == pytest.approx(l2, abs=1e-6)
    for a, b in zip(g1[0], g2[0]):  # step 1: same weights, same examples, same gradient
        torch.testing.assert_close(a, b, atol=1e-6 * float(a.abs().max()), rtol=1e-5)


def test_checkpoint_resume_is_exact(tok, base_model, tmp_path):
    data = paired(tok, 16)
    cfg = dict(max_steps=4, batch_size=4, scheduler="cosine", warmup_steps=1, eval_every=2)
    straight = fresh(base_model)
    t = Trainer(straight, copy.deepcopy(data), config(**cfg, output_dir=str(tmp_path / "a")),
                eval_data=copy.deepcopy(data), pad_token_id=tok.pad_token_id, log=None)
    full = [r["loss"] for r in t.train()]

    first = fresh(base_model)
    t1 = Trainer(first, copy.deepcopy(data), config(**cfg, output_dir=str(tmp_path / "b"), save_every=2,
                                                    log_file=str(tmp_path / "b" / "metrics.jsonl")),
                 eval_data=copy.deepcopy(data), pad_token_id=tok.pad_token_id, log=None)
    t1.total_steps = 2  # stop half-way; the checkpoint at step 2 is written by the loop
    t1.train()
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                "optimizer.safetensors", "optimizer.json", "trainer.safetensors",
                                                "trainer.json", "state.json"}  # HF model + state, no pickle

    # A new process would start from the initial weights and the raw data: the reference log-probs
    # must come from the checkpoint, not from re-scoring with the trained model.
    resumed = fresh(base_model)
    t2 = Trainer(resumed, copy.deepcopy(data), config(**cfg, output_dir=str(tmp_path / "b")),
                 eval_data=copy.deepcopy(data), pad_token_id=tok.pad_token_id, log=None)
    t2.load_checkpoint("latest")
    assert t2.step == 2
    rest = [r["loss"] for r in t2.train()]
    assert t1.history[0]["loss"] == pytest.approx(full[0], abs=1e-7)
    assert [r["loss"] for r in t1.history] + rest == pytest.approx(full, abs=1e-6)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert any("eval_rewards/accuracies" in r for r in log)


def test_reference_modes_agree(tok, base_model):
    """precompute, a separate frozen model and PEFT adapters-off give the same first step."""
    from peft import LoraConfig, get_peft_model

    data = paired(tok, 8)
    first = {}
    for mode in ("precompute", "model", "adapters"):
        model, ref = fresh(base_model), None
        if mode == "model":
            ref = fresh(base_model)
        if mode == "adapters":
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        # adapters: also with activation checkpointing (non-reentrant, through PEFT)
        trainer = Trainer(model, copy.deepcopy(data), config(max_steps=1, reference=mode,
                                                             gradient_checkpointing=mode == "adapters"), ref_model=ref,
                          pad_token_id=tok.pad_token_id, log=None)
        assert trainer.reference == mode
        record = trainer.train()[0]
        first[mode] = record
        assert record["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference
        assert record["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="no PEFT adapters"):
        Trainer(fresh(base_model), data, config(reference="adapters"), log=None)


def test_precomputed_reference_columns_are_used(tok, base_model):
    data = paired(tok, 8)
    for ex in data.examples:
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -10.0, -5.0
    # columns no model gives: deliberate here, so the stale-reference spot check is switched off
    trainer = Trainer(fresh(base_model), data, config(max_steps=1, check_reference=False),
                      pad_token_id=tok.pad_token_id, log=None)
    assert trainer.reference == "precomputed"
    assert trainer.train()[0]["loss"] != pytest.approx(0.6931472, abs=1e-3)


@pytest.mark.parametrize("loss, options", [("kto", {}), ("ulma", {}), ("simpo", {"cpo_alpha": 0.0}),
                                           ("ipo", {}), ("kldpo", {})])
def test_other_losses_train(tok, base_model, loss, options):
    pointwise = loss in ("kto", "ulma")
    if pointwise:
        rows = []
        for i, line in enumerate(open(demo_data_path()).read().splitlines()[:8]):
            rec = json.loads(line)
            rows.append({"prompt": rec["prompt"], "completion": rec["chosen"], "label": True})
            rows.append({"prompt": rec["prompt"], "completion": rec["rejected"], "label": False})
        data = load_preferences(rows, tok, kl_pairs=loss == "kto")
    else:
        data = paired(tok, 8)
    trainer = Trainer(fresh(base_model), data, config(loss=loss, loss_options=options, max_steps=2),
                      eval_data=copy.deepcopy(data), pad_token_id=tok.pad_token_id, log=None)
    assert trainer.reference == ("none" if loss == "simpo" else "precompute")
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    ev = trainer.evaluate()
    assert ("eval_rewards/chosen" if pointwise else "eval_rewards/accuracies") in ev


def test_data_and_loss_layout_mismatch(tok, base_model):
    data = paired(tok, 8)
    with pytest.raises(ValueError, match="needs pointwise data"):
        Trainer(fresh(base_model), data, config(loss="kto"), log=None)
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        Trainer(fresh(base_model), data, config(batch_size=16), log=None)


def test_schedules():
    lin = lr_lambda("linear", 2, 10)
    assert [lin(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    cos = lr_lambda("cosine", 0, 10)
    assert [cos(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda("constant", 3, 10)(7) == 1.0


def test_train_command(tmp_path, capsys):
    from fastpref.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--tiny", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--eval-fraction",
               "0.25", "--output-dir", str(out), "--save-every", "2", "--no-progress", "--max-length", "128"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrapper check" in text and "eval @ step 2" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (out / "checkpoint-2" / "state.json").is_file()
    assert (out / "final" / "config.json").is_file()
