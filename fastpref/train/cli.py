"""Preference optimisation of a causal LM with fused log-probs (``fastpref train``).

A minimal, honest loop: any loss of :mod:`fastpref.losses` by name (DPO family, SimPO, ORPO, KLDPO,
Dr. DPO, KTO, ULMA ...), AdamW with a linear / cosine / constant schedule and warmup, gradient
accumulation, gradient clipping, periodic evaluation on a held-out split (reward accuracy and margins),
checkpoints that resume exactly (model, optimizer, scheduler, step, data position, RNG, precomputed
reference), a JSONL metrics log and a progress bar with loss, tokens/s and peak memory. Under
``torchrun`` it trains with DDP (gloo on CPU, nccl on GPU); batch-coupled losses get the process group.

Reference log-probs (``--reference``): ``precomputed`` (columns in the data), ``precompute`` (a first
pass with the initial model, stored with the checkpoints), ``adapters`` (the same PEFT model with its
adapters disabled), ``model`` (a separate frozen model), ``none`` (reference-free losses); ``auto``
picks in that order of preference what the loss, the data and the model allow.

Log-probs (``--logps``): ``fused`` runs the backbone and the fused chunked op (no ``[S, T, V]``
logits); ``naive`` runs the model's own forward and a full ``log_softmax`` (the usual baseline).

Models: ``--model`` takes the spec of :func:`fastpref.models.load_model` (``smollm2``,
``tiny[:ARCH[:SEED]]``, a local directory or a ``.gguf`` file).

Outputs: a run holds ``--output-dir``'s lock (``.fastpref.lock``, with its pid) while it writes; a second
run on the same directory is refused, and so is a fresh run into a directory holding another run's
checkpoints or metrics. Checkpoints hold no pickle (safetensors + JSON) and carry the run's fingerprint
(loss and options, optimisation and batch settings, a hash of the tokenised data, the model, the
fastpref version): ``--resume`` with anything changed is refused, listing it (``--allow-changes``
continues anyway); the metrics log is cut back to the checkpoint's step. ``--max-grad-norm none``
switches clipping off. User mistakes print one line and exit 2 (``--debug``: with the traceback).

Every ``checkpoint-N/`` and ``final/`` is a Hugging Face model directory (``AutoModelForCausalLM.from_pretrained``,
or for LoRA ``PeftModel.from_pretrained`` on the base model its ``adapter_config.json`` names). Metrics use
TRL's names (``loss``, ``rewards/chosen`` ..., ``eval_*``) in ``metrics.jsonl``; ``--report-to tensorboard``
also writes them to ``<output-dir>/runs``. ``--config run.yaml``: options from a YAML file whose keys are
the option names (dashes or underscores); options on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from fastpref.errors import (UsageError, fraction, nonnegative_float, nonnegative_int, positive_float,
                             positive_float_or_off, positive_int)
from fastpref.models import (ModelNotFoundError, add_model_arguments, demo_data_path, is_tiny_spec, load_model,
                             pick_device, quiet_known_warnings, want_packing)
from fastpref.step import PRECISIONS
from fastpref.step.packing import DEFAULT_MAX_TOKENS_PER_ROW
from fastpref.train.trainer import (REFERENCE_MODES, REPORT_TO, SCHEDULERS, Trainer, TrainConfig, dist_info,
                                    init_distributed, latest_checkpoint)

DESCRIPTION = """\
Preference optimisation of a causal LM (DPO family, SimPO, ORPO, KLDPO, Dr. DPO, KTO, ULMA ...) with fused
log-probs: the model never builds its full vocabulary logits.

Checkpoints (checkpoint-N/ every --save-every steps, and final/) are Hugging Face model directories: load
them with AutoModelForCausalLM.from_pretrained(path), or for LoRA with PeftModel.from_pretrained(base, path)
on the base model named in adapter_config.json. --resume continues a run exactly; it refuses a checkpoint
written with other settings, data or model (--allow-changes continues anyway).

Metrics go to OUTPUT_DIR/metrics.jsonl under TRL's names (loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, grad_norm, learning_rate; evaluation
as eval_*), and with --report-to tensorboard also to OUTPUT_DIR/runs.

--config FILE reads options from a YAML file whose keys are the option names (dashes or underscores,
e.g. "lr: 1.0e-5" or "batch_size: 8"; TRL's learning_rate, gradient_accumulation_steps,
per_device_train_batch_size, num_train_epochs and lr_scheduler_type are accepted too); options given on
the command line override the file.

Under torchrun the run is data-parallel (gloo on CPU, nccl on GPU)."""


# config-file keys that name a flag differently (TRL's / transformers' names)
CONFIG_ALIASES = {"learning-rate": "--lr", "gradient-accumulation-steps": "--grad-accum",
                  "per-device-train-batch-size": "--batch-size", "num-train-epochs": "--epochs",
                  "lr-scheduler-type": "--scheduler"}


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default (unless its help already says it) and keeps the description's
    paragraphs."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        d = action.default
        shown = ("off" if d is False else "on" if d is True else "none" if d is None
                 else "none given" if d == [] else "%(default)s")
        return f"{text} (default: {shown})".strip()

    def _fill_text(self, text, width, indent):
        return "\n\n".join(textwrap.fill(" ".join(par.split()), width, initial_indent=indent,
                                         subsequent_indent=indent) for par in text.split("\n\n"))


def model_spec(args) -> str:
    """The model spec, with the old ``--tiny`` / ``--tiny-arch`` flags folded in."""
    spec = args.model
    if getattr(args, "tiny", False):
        spec = "tiny"
    if spec == "tiny" and getattr(args, "tiny_arch", None):
        spec = f"tiny:{args.tiny_arch}"
    return spec


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--loss-option: expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="same as --model tiny (kept for old scripts)")
    parser.add_argument("--tiny-arch", default=None, help="same as --model tiny:ARCH (kept for old scripts)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None,
                   help="TRL-format JSONL (paired or point-wise) (default: the built-in demo set)")
    d.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    d.add_argument("--eval-fraction", type=fraction, default=0.1,
                   help="fraction of --data held out for evaluation when there is no --eval-data (0: none)")
    d.add_argument("--format", default="auto", choices=("auto", "paired", "pointwise"),
                   help="data layout: paired (prompt, chosen, rejected) or pointwise (completion, label); "
                        "auto: from the first record")
    d.add_argument("--max-length", type=positive_int, default=1024, help="most tokens of prompt + answer")
    d.add_argument("--max-prompt-length", type=positive_int, default=512, help="most prompt tokens")
    d.add_argument("--max-completion-length", type=positive_int, default=None,
                   help="most answer tokens (default: no limit of its own)")
    d.add_argument("--truncation-mode", default="keep_end", choices=("keep_end", "keep_start"),
                   help="which end of a too-long prompt to keep")
    d.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records instead of failing")
    o = parser.add_argument_group("objective")
    o.add_argument("--loss", default="sigmoid", help="a loss of fastpref.losses (sigmoid, ipo, simpo, orpo, kto, ulma, kldpo ...)")
    o.add_argument("--beta", type=positive_float, default=0.1,
                   help="strength of the pull towards the reference (the loss's beta)")
    o.add_argument("--loss-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loss option, JSON value (e.g. label_smoothing=0.1, gamma=0.5); repeatable "
                        "(default: none)")
    o.add_argument("--logps", default="fused", choices=("fused", "naive"),
                   help="fused: prefix-shared packed rows and the fused op; naive: the model's own logits and "
                        "log_softmax (the usual baseline)")
    o.add_argument("--reference", default="auto", choices=REFERENCE_MODES,
                   help="reference log-probs: precomputed (columns in the data), precompute (a first pass with "
                        "the initial model), adapters (LoRA switched off), model (--ref-model), none; auto: the "
                        "first of these the loss, data and model allow")
    o.add_argument("--check-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="spot-check precomputed reference columns against the reference model on 4 examples at "
                        "start and stop on a mismatch (--no-check-reference: use them as they are)")
    o.add_argument("--ref-model", default=None,
                   help="local directory / .gguf of a separate reference model (default: none)")
    o.add_argument("--backend", default="auto", choices=("auto", "cpp", "triton", "torch"), help="fused op backend")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--lr", type=positive_float, default=5e-6,
                   help="peak learning rate of AdamW")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay")
    t.add_argument("--scheduler", default="linear", choices=SCHEDULERS,
                   help="learning-rate schedule after warmup (decay to 0 at the last step, or constant)")
    t.add_argument("--warmup-steps", type=nonnegative_int, default=0,
                   help="optimizer steps of linear warmup from 0")
    t.add_argument("--batch-size", type=positive_int, default=4, help="examples per process per micro-batch")
    t.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    t.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps to run (default: --epochs passes over the training data)")
    t.add_argument("--epochs", type=positive_int, default=1, help="passes over the training data")
    t.add_argument("--max-grad-norm", type=positive_float_or_off, default=1.0,
                   help="clip the gradient norm to this (> 0); 'none' or 'off': no clipping")
    t.add_argument("--seed", type=int, default=0, help="seed of data order, eval split and initialisation")
    t.add_argument("--packing", default="auto", choices=("auto", "on", "off"),
                   help="padding-free rows on the naive path; auto: on with flash attention on GPU")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time)")
    t.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="run each prompt once with all its answers (prefix sharing)")
    t.add_argument("--max-tokens-per-row", type=positive_int, default=DEFAULT_MAX_TOKENS_PER_ROW,
                   help="row length of the packed, padding-free step")
    t.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="fp32, bf16-mixed (autocast, fp32 weights) or bf16; auto: bf16-mixed where the device "
                        "has fast bf16 (CUDA with bf16, CPU with AVX512-BF16 or AMX), else fp32")
    t.add_argument("--lora-r", type=nonnegative_int, default=0,
                   help="train LoRA adapters of this rank on every linear layer (0: full fine-tuning)")
    t.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA scaling numerator")
    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", default="fastpref-out",
                   help="where checkpoints, final/, metrics.jsonl and runs/ go")
    r.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate every N optimizer steps (default: at the start and the end only)")
    r.add_argument("--save-every", type=positive_int, default=None,
                   help="write checkpoint-N every N optimizer steps (default: none, only final/)")
    r.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --output-dir (refused when "
                                                  "the loss, optimisation, batch, data or model settings changed) "
                                                  "(default: a fresh run)")
    r.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if settings changed since the checkpoint (they are listed)")
    r.add_argument("--no-save", action="store_true", help="do not save the final model")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--report-to", default="none", choices=REPORT_TO,
                   help="logging backend besides metrics.jsonl: tensorboard writes to OUTPUT_DIR/runs")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of options (keys: option names, dashes or underscores); the command line "
                        "overrides it (default: none)")
    _plain_model_help(parser)
    parser.formatter_class = HelpFormatter
    parser.description = DESCRIPTION
    _read_config_first(parser)


def _plain_model_help(parser) -> None:
    """Help for the shared model options that have none (so their defaults show too)."""
    helps = {"dtype": "weight dtype the model is loaded in",
             "device": "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; under torchrun each "
                       "process's own GPU)",
             "attn_implementation": "attention kernel of the model, e.g. sdpa, eager, flash_attention_2 "
                                    "(default: the model's own choice)"}
    for action in parser._actions:
        if action.dest in helps and (not action.help or "(default" not in action.help):
            action.help = helps[action.dest]


# -- --config run.yaml ---------------------------------------------------------------------------


def _config_file(argv) -> Optional[str]:
    """The value of the last ``--config FILE`` / ``--config=FILE`` in ``argv``."""
    found = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
    return found


def _scalar(action, value) -> str:
    if isinstance(value, bool):
        if action.choices and "on" in action.choices:  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise ValueError("expected a single value")
    return str(value)


def _config_tokens(action, flag: str, value) -> list:
    """Command-line tokens equivalent to ``key: value`` of the YAML file."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        if flag.startswith("--no-"):  # no_share_prompt: true
            flag, value = "--" + flag[5:], not value
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # loss_option: {label_smoothing: 0.1}
            items = [f"{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            items = [_scalar(action, v) for v in (value if isinstance(value, list) else [value])]
        return [t for item in items for t in (flag, item)]
    if value is None:
        if action.type is positive_float_or_off:
            return [flag, "none"]
        if action.default is None:
            return []
        raise ValueError("expected a value, got null")
    return [flag, _scalar(action, value)]


def config_argv(parser, path: str, parse=None) -> list:
    """The options of YAML file ``path`` as command-line tokens for ``parser`` (put them before the
    real command line, so that options given there win). Keys are option names with dashes or
    underscores. Raises :class:`UsageError` (``path: unknown key 'x'``, ``path:LINE: invalid YAML``,
    ``path:LINE: key: <what argparse says>``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    text = p.read_bytes().decode("utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}: invalid YAML ({what})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in getattr(root, "value", [])}
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    by_flag.update({"--" + k: by_flag[f] for k, f in CONFIG_ALIASES.items() if f in by_flag})
    tokens = []
    for key, value in data.items():
        name = str(key)
        flag = "--" + name.replace("_", "-")
        action = by_flag.get(flag)
        flag = CONFIG_ALIASES.get(flag[2:], flag)
        if action is None or name.replace("_", "-") in ("config", "help", "debug"):
            raise UsageError(f"{path}: unknown key {name!r}")
        where = f"{path}:{lines[name]}" if name in lines else path
        try:
            mine = _config_tokens(action, flag, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {name}: {exc}") from None
        if parse is not None:  # check the value alone now, so the error names the file and line
            try:
                parse(mine)
            except UsageError as exc:
                raise UsageError(f"{where}: {name}: {str(exc).split(': ', 1)[-1]}") from None
        tokens += mine
    return tokens


def _read_config_first(parser) -> None:
    """Make ``parser`` read ``--config FILE`` before the rest of the command line (which overrides it)."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        path = _config_file(args)
        if path is not None:
            args = config_argv(parser, path, parse=lambda toks: original(toks)) + args
        return original(args, namespace)

    parser.parse_known_args = parse_known_args


def _check_objective(args, loss_options) -> None:
    """Build the objective once to check --loss, --beta and --loss-option before any model loads."""
    from fastpref.losses import PreferenceObjective

    try:
        PreferenceObjective(args.loss, beta=args.beta, **loss_options)
    except TypeError as exc:
        raise UsageError(f"--loss-option {exc}") from None
    except ValueError as exc:
        text = str(exc)
        for key, flag in (("loss:", "--loss"), ("beta:", "--beta")):
            if text.startswith(key):
                raise UsageError(flag + text[len(key) - 1:]) from None
        raise UsageError(f"--loss-option {text}") from None


def _check_paths(args) -> None:
    """Input files that are not there, an output directory that cannot be one, a bad --resume, and a
    fresh run into the output directory of another run: one line each, before any model loads."""
    for flag, value in (("--data", args.data), ("--eval-data", args.eval_data)):
        if value is None:
            continue
        p = Path(value)
        if not p.exists():
            raise UsageError(f"{flag} {value}: no such file")
        if p.is_dir():
            raise UsageError(f"{flag} {value}: is a directory, not a JSONL file")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file, not a directory")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--output-dir {out}: {parent} is a file, not a directory")
    if args.resume and args.resume != "latest":
        ckpt = Path(args.resume)
        if not (ckpt / "state.json").is_file():
            raise UsageError(f"--resume {args.resume}: not a checkpoint directory (no state.json)")
    elif args.resume == "latest" and latest_checkpoint(out) is None:
        raise UsageError(f"--resume latest: no checkpoint-<step> with a state.json under {out}")
    if not args.resume and out.is_dir():
        previous = sorted(p.name for p in out.iterdir() if p.name == "metrics.jsonl" or p.name.startswith("checkpoint-"))
        if previous:
            raise UsageError(f"--output-dir {out} holds another run ({', '.join(previous[:3])}"
                             f"{' ...' if len(previous) > 3 else ''}): continue it with --resume latest, or "
                             "choose another --output-dir")
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes applies to --resume")


def run(args) -> int:
    from fastpref.hf.data import load_preferences

    quiet_known_warnings()
    loss_options = dict(_parse_option(o) for o in args.loss_option)
    _check_paths(args)
    _check_objective(args, loss_options)
    try:
        TrainConfig(loss=args.loss, beta=args.beta, learning_rate=args.lr, max_grad_norm=args.max_grad_norm,
                    weight_decay=args.weight_decay, max_steps=args.max_steps, epochs=args.epochs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = pick_device(args.device)
    init_distributed(device)
    world, rank, _ = dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    data_path = args.data or demo_data_path()
    spec = model_spec(args)
    texts = []
    if is_tiny_spec(spec):
        raw = Path(data_path).read_bytes().decode("utf-8", errors="replace")  # bad lines are reported later
        texts = [line for line in raw.splitlines() if line.strip()]
    try:
        model, tok, desc = load_model(spec, dtype=args.dtype, texts=texts, seed=args.seed,
                                      attn_implementation=args.attn_implementation)
    except (ModelNotFoundError, ValueError, OSError) as exc:
        raise UsageError(f"--model {spec}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    model.to(device)
    say(f"model: {desc} on {device}" + (f", {world} processes" if world > 1 else ""))
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    ref_model = None
    if args.ref_model:
        try:
            ref_model, _, _ = load_model(args.ref_model, dtype=args.dtype, seed=args.seed,
                                         attn_implementation=args.attn_implementation)
        except (ModelNotFoundError, ValueError, OSError) as exc:
            raise UsageError(f"--ref-model {args.ref_model}: {str(exc).splitlines()[0]}") from None
        ref_model.to(device)
    kl = args.loss == "kto" and "z0" not in loss_options
    data_kw = dict(format=args.format, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   max_completion_length=args.max_completion_length, truncation_mode=args.truncation_mode,
                   skip_invalid=args.skip_invalid, kl_pairs=kl)
    data = load_preferences(data_path, tok, **data_kw)
    say(data.report.summary())
    if args.eval_data:
        train_data, eval_data = data, load_preferences(args.eval_data, tok, **data_kw)
        say(eval_data.report.summary())
    elif args.eval_fraction > 0:
        train_data, eval_data = data.split(args.eval_fraction, seed=args.seed)
    else:
        train_data, eval_data = data, None
    say(f"train: {len(train_data)} examples, eval: {0 if eval_data is None else len(eval_data)}")
    out_dir = Path(args.output_dir)
    run_info = {"model": spec, "ref_model": args.ref_model, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                "dtype": args.dtype, "data": str(Path(data_path).resolve()),
                "eval_data": str(Path(args.eval_data).resolve()) if args.eval_data else None,
                "eval_fraction": args.eval_fraction, **{k: v for k, v in data_kw.items() if k != "skip_invalid"}}
    try:
        cfg = TrainConfig(
            loss=args.loss, beta=args.beta, loss_options=loss_options, logps=args.logps, learning_rate=args.lr,
            weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_steps=args.warmup_steps,
            batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs,
            max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
            output_dir=str(out_dir), reference=args.reference, packing=want_packing(model, device, args.packing),
            gradient_checkpointing=args.gradient_checkpointing, backend=args.backend,
            share_prompt=args.share_prompt, max_tokens_per_row=args.max_tokens_per_row, precision=args.precision,
            check_reference=args.check_reference,
            progress=not args.no_progress, log_file=str(out_dir / "metrics.jsonl"), report_to=args.report_to,
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        trainer = Trainer(model, train_data, cfg, eval_data=eval_data, ref_model=ref_model, pad_token_id=pad, log=say,
                          run_info=run_info, tokenizer=tok, model_id=spec)
    except ValueError as exc:  # settings that do not fit the data or the model (messages name them)
        raise UsageError(str(exc)) from None
    trainer.lock_output()  # held to the end: a second run on this --output-dir is refused
    try:
        return _train(args, trainer, cfg, tok, eval_data, out_dir, rank, world, say)
    finally:
        trainer.close()
        trainer.unlock_output()


def _train(args, trainer, cfg, tok, eval_data, out_dir, rank, world, say) -> int:
    err = trainer.policy.verify()
    say(f"wrapper check: fused log-probs match the model's own logits (max |diff| {err:.2e}); "
        f"reference: {trainer.reference}; "
        + (f"naive-path packing: {'on' if cfg.packing else 'off'}; " if cfg.logps == "naive" else "")
        + f"{trainer.total_steps} optimizer steps of {trainer.examples_per_step} examples")
    if args.resume:
        trainer.load_checkpoint(args.resume, allow_changes=args.allow_changes)
    if eval_data is not None and trainer.step == 0:
        ev = trainer.evaluate()
        trainer._write_log(ev)
        say(trainer._format_eval(ev))
    trainer.train()
    if eval_data is not None and not (args.eval_every and trainer.step % args.eval_every == 0):
        ev = trainer.evaluate()
        trainer._write_log(ev)
        say(trainer._format_eval(ev))
    if not args.no_save and rank == 0:
        final = trainer.save_model(out_dir / "final")
        say(f"saved the trained model to {final}; metrics in {cfg.log_file}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0
