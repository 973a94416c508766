"""Outputs of training a user can use (issue 9, item 3): every checkpoint is a Hugging Face model
directory (full fine-tuning: ``AutoModelForCausalLM.from_pretrained``; LoRA: ``PeftModel.from_pretrained``
on the recorded, portable base model id) that also resumes bit-exactly; TRL's metric names in
``metrics.jsonl`` and TensorBoard; ``--config run.yaml``; plain help text with every default shown."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch

from fastpref.cli import main
from fastpref.hf import load_preferences
from fastpref.models import tiny_model, tiny_tokenizer
from fastpref.train import Trainer, TrainConfig, demo_data_path
from fastpref.train.trainer import portable_model_id

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
TRL_TRAIN_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(open(demo_data_path()).read().splitlines(), vocab_size=600)


@pytest.fixture(scope="module")
def base_model(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=0, hidden_size=48, num_layers=2)
    return model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    lines = Path(demo_data_path()).read_text().splitlines()[:16]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def paired(tok, n=8):
    data = load_preferences(demo_data_path(), tok)
    data.examples = data.examples[:n]
    return data


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # LoRA A is drawn from the global generator: the same adapters every time
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def config(out, **kw):
    base = dict(learning_rate=1e-2, batch_size=4, max_steps=4, progress=False, precision="fp32",
                scheduler="cosine", warmup_steps=1, output_dir=str(out), save_every=2)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def no_pickle(path: Path):
    assert not [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]


# -- checkpoints: HF format and exact resume --------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_checkpoint_loads_with_hf_and_resumes_exactly(tok, base_model, tmp_path, kind):
    """4 straight steps == 2 steps, a fresh process resuming checkpoint-2 from its HF files, 2 more steps:
    bitwise equal trainable weights (fp32). checkpoint-2 loads with the HF / PEFT loaders and holds
    exactly the weights of step 2."""
    from transformers import AutoModelForCausalLM

    wrap = lora if kind == "lora" else (lambda m: m)
    data = paired(tok)

    straight = wrap(copy.deepcopy(base_model))
    t = Trainer(straight, copy.deepcopy(data), config(tmp_path / "a"), pad_token_id=tok.pad_token_id, log=None,
                tokenizer=tok, model_id="org/tiny-base")
    t.train()

    half = wrap(copy.deepcopy(base_model))
    t1 = Trainer(half, copy.deepcopy(data), config(tmp_path / "b"), pad_token_id=tok.pad_token_id, log=None,
                 tokenizer=tok, model_id="org/tiny-base")
    t1.total_steps = 2  # stop half-way; the loop writes checkpoint-2
    t1.train()
    at_two = trainable(half)
    ckpt = tmp_path / "b" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    no_pickle(ckpt)
    assert {"state.json", "optimizer.safetensors", "trainer.safetensors", "tokenizer.json"} <= names
    assert "trainer_params.safetensors" not in names  # every trainable parameter is in the HF files

    if kind == "full":
        assert {"config.json", "model.safetensors"} <= names
        loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
        for n, p in loaded.named_parameters():
            assert torch.equal(p, dict(half.named_parameters())[n]), n
    else:
        from peft import PeftModel

        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
        cfg = json.loads((ckpt / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "org/tiny-base"
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(ckpt))
        lp = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
        mine = {n.replace(".default", ""): p for n, p in half.named_parameters() if "lora_" in n}
        assert lp.keys() == mine.keys() and lp
        for n in lp:
            assert torch.equal(lp[n], mine[n]), n
    # the HF-loaded model computes what the trained one computes
    ids = torch.tensor([[1, 5, 9, 13, 17, 3]])
    loaded.eval(), half.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, half(input_ids=ids).logits)

    resumed = wrap(copy.deepcopy(base_model))  # initial weights: everything trained comes from the files
    t2 = Trainer(resumed, copy.deepcopy(data), config(tmp_path / "b"), pad_token_id=tok.pad_token_id, log=None,
                 tokenizer=tok, model_id="org/tiny-base")
    t2.load_checkpoint(ckpt)
    for n, p in trainable(resumed).items():
        assert torch.equal(p, at_two[n]), n
    t2.train()
    final_straight, final_resumed = trainable(straight), trainable(resumed)
    assert final_straight.keys() == final_resumed.keys()
    changed = 0
    for n in final_straight:
        assert torch.equal(final_straight[n], final_resumed[n]), n
        changed += not torch.equal(final_straight[n], at_two[n])
    assert changed  # the last two steps did train


def test_resume_refuses_a_checkpoint_without_its_weights(tok, base_model, tmp_path):
    from fastpref.train.trainer import CheckpointError

    data = paired(tok)
    t = Trainer(copy.deepcopy(base_model), copy.deepcopy(data), config(tmp_path, max_steps=2),
                pad_token_id=tok.pad_token_id, log=None)
    t.train()
    (tmp_path / "checkpoint-2" / "model.safetensors").unlink()
    t2 = Trainer(copy.deepcopy(base_model), copy.deepcopy(data), config(tmp_path, max_steps=2),
                 pad_token_id=tok.pad_token_id, log=None)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        t2.load_checkpoint(tmp_path / "checkpoint-2")


def test_adapter_config_never_records_a_cache_path(tok, base_model, tmp_path, monkeypatch):
    """PEFT records the base config's path, often a hub cache snapshot; the trainer records a portable id."""
    cache = str(Path.home() / ".cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc")
    model = copy.deepcopy(base_model)
    model.config.name_or_path = cache
    model = lora(model)
    model.peft_config["default"].base_model_name_or_path = cache  # what PEFT records for a hub-loaded model
    t = Trainer(model, paired(tok), config(tmp_path, max_steps=2), pad_token_id=tok.pad_token_id, log=None)
    t.train()
    for d in (tmp_path / "checkpoint-2", t.save_model(tmp_path / "final")):
        recorded = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert ".cache" not in recorded and not recorded.startswith("/")


def test_portable_model_id():
    home = str(Path.home())
    assert portable_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_model_id(f"{home}/.cache/huggingface/hub/models--org--name/snapshots/0123") == "org/name"
    assert portable_model_id(f"{home}/.cache/something/model", "org/x") == "org/x"  # a cache path is skipped
    assert portable_model_id("./my-model", "ignored") == "./my-model"  # a user's directory, as given
    assert portable_model_id(None, "", "meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert portable_model_id(f"{home}/.cache/x") is None


def test_cli_lora_run_records_the_spec_and_final_loads(data_file, tmp_path):
    """`fastpref train --model tiny --lora-r 4`: checkpoint and final/ are adapters on base "tiny"
    (the spec the user gave), loadable with PeftModel.from_pretrained on that base."""
    from peft import PeftModel

    from fastpref.models import load_model

    out = tmp_path / "o"
    assert main(["train", "--model", "tiny", "--data", str(data_file), "--output-dir", str(out), "--max-steps", "2",
                 "--save-every", "2", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "4", "--eval-fraction", "0",
                 "--max-length", "96", "--no-progress", "--precision", "fp32"]) == 0
    texts = [line for line in data_file.read_text().splitlines() if line.strip()]
    for d in (out / "checkpoint-2", out / "final"):
        no_pickle(d)
        assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
        base, _, _ = load_model("tiny", texts=texts)
        peft = PeftModel.from_pretrained(base, str(d))
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft.named_parameters())  # trained adapters


# -- metrics: TRL names, JSONL and TensorBoard -------------------------------------------------------


def test_metrics_use_trl_names_in_jsonl_and_tensorboard(data_file, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    assert main(["train", "--model", "tiny", "--data", str(data_file), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0.25", "--max-length", "96", "--no-progress",
                 "--precision", "fp32", "--no-save", "--report-to", "tensorboard"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        assert TRL_TRAIN_KEYS <= r.keys()
        assert not {"lr", "margin", "reward_accuracy", "chosen_reward"} & r.keys()
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0 and r["grad_norm"] > 0
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at step 1
    for r in evals:
        assert {"eval_loss", "eval_rewards/chosen", "eval_rewards/accuracies", "eval_logps/chosen"} <= r.keys()
    assert "rewards/accuracies" in capsys.readouterr().out  # the eval lines printed during the run

    events = list((out / "runs").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/learning_rate", "train/grad_norm", "eval/loss",
            "eval/rewards/margins"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], abs=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 2]


def test_report_to_is_checked():
    with pytest.raises(ValueError, match="report_to: expected one of none, tensorboard"):
        TrainConfig(report_to="wandb")
    with pytest.raises(ValueError, match="report_to='tensorboard': needs output_dir"):
        TrainConfig(report_to="tensorboard")


# -- --config run.yaml -------------------------------------------------------------------------------


def parse(argv):
    """The namespace ``fastpref train`` would run with (no training)."""
    from fastpref.errors import CommandParser
    from fastpref.train import cli

    parser = CommandParser(prog="fastpref train")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\nbatch_size: 8\nlearning-rate: 1.0e-4\nmax_grad_norm: null\nshare_prompt: false\n"
                   "gradient_checkpointing: true\npacking: off\nloss_option: {label_smoothing: 0.1}\nmax_steps: 3\n")
    args = parse(["--config", str(cfg)])
    assert (args.model, args.batch_size, args.lr) == ("tiny", 8, 1e-4)
    assert args.max_grad_norm is None and args.share_prompt is False
    assert args.gradient_checkpointing and args.packing == "off" and args.loss_option == ["label_smoothing=0.1"]
    # the command line overrides, before or after --config, even with the built-in default value
    args = parse(["--batch-size", "2", "--config", str(cfg), "--lr", "5e-6", "--share-prompt"])
    assert (args.batch_size, args.lr, args.share_prompt, args.max_steps) == (2, 5e-6, True, 3)


@pytest.mark.parametrize("text, message", [
    ("lr: 1e-3\nx: 1\n", "{f}: unknown key 'x'"),
    ("config: other.yaml\n", "{f}: unknown key 'config'"),
    ("lr: 1e-3\nbatch_size: [1,\n", "{f}:3: invalid YAML ("),
    ("lr: 1e-3\n  bad: indent\n", "{f}:2: invalid YAML ("),
    ("- lr\n", "{f}: expected a mapping of option names to values, got list"),
    ("lr: 1e-3\nbatch_size: -1\n", "{f}:2: batch_size: expected an integer >= 1, got -1"),
    ("scheduler: sometimes\n", "{f}:1: scheduler: invalid choice: 'sometimes'"),
    ("gradient_checkpointing: 3\n", "{f}:1: gradient_checkpointing: expected true or false, got 3"),
])
def test_config_file_mistakes_are_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("fastpref train: " + message.format(f=cfg)), lines[0]
    assert not (tmp_path / "o").exists()


def test_config_file_missing(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"fastpref train: --config {tmp_path}/nope.yaml: no such file"


def test_config_file_runs_training(data_file, tmp_path):
    out = tmp_path / "o"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny\ndata: {data_file}\noutput_dir: {out}\nmax_steps: 3\nbatch_size: 2\n"
                   "eval_fraction: 0\nmax_length: 96\nno_progress: true\nno_save: true\nprecision: fp32\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "1"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # --max-steps 1 on the command line beat the file's 3


# -- help ----------------------------------------------------------------------------------------------


def test_help_is_plain_and_shows_every_default(capsys):
    from fastpref.errors import CommandParser
    from fastpref.train import cli

    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and ":class:" not in text and ":func:" not in text
    assert not re.search(r":\w+:`", text)
    # one block per option: from its "  --flag" line to the next option line
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    parser = CommandParser(prog="fastpref train")
    cli.add_arguments(parser)
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        block = " ".join(blocks[action.option_strings[0]].split())
        assert "(default:" in block, block
        if action.default not in (None, False, True, []):
            assert f"(default: {action.default})" in block, block
        checked += 1
    assert checked >= 40


def test_config_file_takes_trl_names_and_negated_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 2.0e-5\ngradient_accumulation_steps: 4\nno_share_prompt: true\n")
    args = parse(["--config", str(cfg)])
    assert (args.lr, args.grad_accum, args.share_prompt) == (2e-5, 4, False)
    cfg.write_text("no-share-prompt: false\n")
    assert parse(["--config", str(cfg)]).share_prompt is True


def test_trainable_parameters_outside_the_adapter_resume_exactly(tok, base_model, tmp_path):
    """LoRA plus a trainable head (not part of the adapter files): the head goes to
    trainer_params.safetensors, and resume is still exact."""
    def model():
        m = lora(copy.deepcopy(base_model))
        m.get_base_model().lm_head.weight.requires_grad_(True)
        return m

    data = paired(tok)
    straight = model()
    Trainer(straight, copy.deepcopy(data), config(tmp_path / "a"), pad_token_id=tok.pad_token_id, log=None).train()
    half = model()
    t1 = Trainer(half, copy.deepcopy(data), config(tmp_path / "b"), pad_token_id=tok.pad_token_id, log=None)
    t1.total_steps = 2
    t1.train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    from safetensors.torch import load_file

    extra = load_file(str(ckpt / "trainer_params.safetensors"))
    assert len(extra) == 1 and next(iter(extra)).endswith(("lm_head.weight", "embed_tokens.weight"))
    resumed = model()
    t2 = Trainer(resumed, copy.deepcopy(data), config(tmp_path / "b"), pad_token_id=tok.pad_token_id, log=None)
    t2.load_checkpoint(ckpt)
    t2.train()
    a, b = trainable(straight), trainable(resumed)
    assert a.keys() == b.keys() and len(a) > 1
    for n in a:
        assert torch.equal(a[n], b[n]), n
