"""Setup for the DPO loss benchmark (issue 3): three ways to get a sigmoid-DPO loss and its gradients
w.r.t. the policy's final hidden states and lm_head weight, eager and ``torch.compile``d.

Contenders (every one computes ``mean_i softplus(-beta * ((pc_i - pr_i) - (rc_i - rr_i))))`` with
``pc``/``pr`` the *summed* response-token log-probs of chosen / rejected sequence i):

    fastpref  ``FusedPreferenceLoss("sigmoid", beta=0.1)`` on hidden states + lm_head weight with
              precomputed reference log-probs (``ref_logps``): chunked, logits never materialised.
    naive     ``hidden @ W.T`` ([N, V] logits in the input dtype), fp32 ``log_softmax``, ``gather``,
              masked sum per sequence, then :func:`fastpref.losses.dpo_loss` (autograd for the rest).
    liger     Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``liger_kernel.chunked_loss``), configured to
              the same loss: ``loss_type="sigmoid"``, ``average_log_prob=False`` (sums, not means),
              ``compute_nll_loss=False``, ``ignore_index=-100``, ``chunk_size=1`` (its default: one
              chosen/rejected pair per chunk), ``use_ref_model=False`` (see *Reference* below).

Modes: ``eager``; ``compiled`` = ``torch.compile`` of the whole loss call for fastpref and naive, and
Liger's own ``compiled=True`` (it compiles its per-chunk forward+backward step; ``eager`` is
``compiled=False``).

Reference: Liger's DPO cannot take precomputed reference log-probs: it either recomputes them from a
reference model's hidden states and weight inside every chunk (``use_ref_model=True``) or runs without
a reference (``use_ref_model=False``). Sigmoid DPO depends on the reference only through the margin
``rc_i - rr_i``, so the batch gives every pair a precomputed reference with ``rc_i == rr_i`` (random,
non-zero values): fastpref and naive receive them as a tensor and compute exactly what Liger's
reference-free path computes, with the same work (two subtractions per pair more).

Batch: ``N`` tokens = ``2B`` sequences of ``T`` tokens (chosen rows ``[0, B)``, rejected ``[B, 2B)``,
pair i = (i, B + i)), shapes from :data:`bench.cases.PRESETS`. The rejected sequence of a pair shares
the chosen one's labels (and prompt mask) with hidden states perturbed by 0.1 standard deviations, so
the DPO margins are O(1) (gradients not saturated) and the loss values are a meaningful cross-check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from fastpref.compare import DTYPES, make_inputs
from fastpref.ops.constants import IGNORE_INDEX

BETA = 0.1
CONTENDERS = ("fastpref", "naive", "liger")
MODES = ("eager", "compiled")
LIGER_CHUNK_SIZE = 1  # pairs per chunk: Liger's default


# Small shapes for smoke runs and the default pytest-benchmark run: (N, H, V, T).
SMALL_PRESETS = {"tiny": (512, 128, 2000, 128), "small": (2048, 512, 16000, 512)}


def shape_of(preset: str) -> Tuple[int, int, int, int]:
    """``(n_tokens, hidden, vocab, seq_len)`` of a :data:`bench.cases.PRESETS` name (the core-op
    benchmark's shapes) or of :data:`SMALL_PRESETS`."""
    from bench.cases import PRESETS

    if preset in PRESETS:
        s = PRESETS[preset]
        return s.n_tokens, s.hidden, s.vocab, s.seq_len
    if preset in SMALL_PRESETS:
        return SMALL_PRESETS[preset]
    raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS) + sorted(SMALL_PRESETS)}")


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class DPOInputs:
    """``hidden [2B, T, H]``, ``weight [V, H]``, ``labels [2B, T]`` (``IGNORE_INDEX`` on prompt rows),
    ``ref_logps [2B]`` fp32 precomputed reference sums (``rc_i == rr_i``, see the module doc)."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor
    ref_logps: Tensor

    @property
    def n_pairs(self) -> int:
        return self.hidden.shape[0] // 2

    @property
    def n_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, dtype: torch.dtype) -> "DPOInputs":
        return DPOInputs(self.hidden.detach().to(dtype), self.weight.detach().to(dtype), self.labels,
                         self.ref_logps)


def make_dpo_inputs(n_tokens: int, hidden: int, vocab: int, dtype: str = "fp32", prompt_frac: float = 0.0,
                    seq_len: int = 1024, seed: int = 0, noise: float = 0.1) -> DPOInputs:
    """Random DPO batch of ``n_tokens`` tokens (``n_tokens // seq_len`` sequences, an even number)."""
    seq_len = min(seq_len, n_tokens // 2)
    if n_tokens % (2 * seq_len):
        raise ValueError(f"n_tokens={n_tokens} must be a multiple of 2 * seq_len = {2 * seq_len}")
    half = make_inputs(n_tokens // 2, hidden, vocab, "fp32", prompt_frac, seq_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rejected = half.hidden + noise * torch.randn(half.hidden.shape, generator=g)
    dt = DTYPES[dtype]
    h = torch.cat([half.hidden, rejected]).to(dt).contiguous()
    labels = torch.cat([half.labels, half.labels]).contiguous()
    B = half.hidden.shape[0]
    n_resp = (half.labels != IGNORE_INDEX).sum(-1).float()
    ref_pair = -n_resp * (math.log(vocab) + 2.0) + torch.randn(B, generator=g)
    return DPOInputs(h, half.weight.to(dt).contiguous(), labels, torch.cat([ref_pair, ref_pair]))


def preset_dpo_inputs(preset: str, dtype: str = "fp32", prompt_frac: float = 0.0, seed: int = 0,
                      n_tokens: Optional[int] = None, seq_len: Optional[int] = None) -> DPOInputs:
    N, H, V, T = shape_of(preset)
    return make_dpo_inputs(n_tokens or N, H, V, dtype, prompt_frac, seq_len or T, seed)


# ---------------------------------------------------------------------------------------------------
# Contenders: each is ``loss_fn(hidden, weight, labels, ref_logps) -> scalar loss`` (differentiable)


def naive_logps(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """[S] fp32 sums of response-token log-probs via materialised [S*T, V] logits."""
    S, T, H = hidden.shape
    logits = hidden.reshape(S * T, H) @ weight.t()
    logp = torch.log_softmax(logits.float(), dim=-1)
    flat = labels.reshape(-1)
    mask = flat != IGNORE_INDEX
    tok = logp.gather(1, torch.where(mask, flat, 0)[:, None]).squeeze(1)
    return (tok * mask).view(S, T).sum(-1)


def _dpo_from_logps(logps: Tensor, ref_logps: Tensor) -> Tensor:
    from fastpref.losses import dpo_loss

    B = logps.shape[0] // 2
    return dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=BETA, loss_type="sigmoid").loss


def _naive_loss(hidden, weight, labels, ref_logps):
    return _dpo_from_logps(naive_logps(hidden, weight, labels), ref_logps)


def liger_available() -> Optional[str]:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported
        return f"liger-kernel chunked DPO unavailable ({type(exc).__name__}: {exc})"
    return None


def contender_available(contender: str) -> Optional[str]:
    if contender == "liger":
        return liger_available()
    if contender in ("fastpref", "naive"):
        return None
    return f"unknown contender {contender!r}; expected one of {CONTENDERS}"


def loss_fn(contender: str, mode: str = "eager") -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if contender == "fastpref":
        from fastpref.losses import FusedPreferenceLoss

        module = FusedPreferenceLoss("sigmoid", beta=BETA, ignore_index=IGNORE_INDEX)

        def fn(h, w, y, ref):
            return module(h, w, y, ref_logps=ref).loss

        return torch.compile(fn) if mode == "compiled" else fn
    if contender == "naive":
        return torch.compile(_naive_loss) if mode == "compiled" else _naive_loss
    if contender == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        module = LigerFusedLinearDPOLoss(
            ignore_index=IGNORE_INDEX, beta=BETA, compute_nll_loss=False, compiled=mode == "compiled",
            use_ref_model=False, average_log_prob=False, chunk_size=LIGER_CHUNK_SIZE, loss_type="sigmoid",
        )

        def fn(h, w, y, ref):  # ref: rc == rr per pair, so the reference-free loss is the same loss
            return module(w, h, y)[0]

        return fn
    raise ValueError(f"unknown contender {contender!r}; expected one of {CONTENDERS}")


def run_dpo(fn: Callable, inputs: DPOInputs) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward + backward; returns ``(loss, grad_hidden, grad_weight)``."""
    h = inputs.hidden.detach().requires_grad_(True)
    w = inputs.weight.detach().requires_grad_(True)
    loss = fn(h, w, inputs.labels, inputs.ref_logps)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _compile_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _warm(fn: Callable, inputs: DPOInputs, mode: str) -> None:
    """Run once (eager) or at three small sequence lengths (compiled: from the second shape on dynamo
    compiles dynamic-shape graphs; the row count after fastpref's data-dependent compaction needs a
    third, so the full batch then reuses the graphs) on tiny batches with the benchmark's H, V, dtype
    and masking, so one-time costs are not charged to the measured step."""
    S, T, H = inputs.hidden.shape
    V = inputs.weight.shape[0]
    frac = float((inputs.labels[0] == IGNORE_INDEX).sum()) / T
    dtype = next(k for k, v in DTYPES.items() if v == inputs.hidden.dtype)
    for t in ((32,) if mode == "eager" else (32, 48, 64)):
        tiny = make_dpo_inputs(S * t, H, V, dtype, frac, t, seed=1)
        run_dpo(fn, tiny)


def needs_full_warmup(contender: str, mode: str) -> bool:
    """``torch.compile`` of fastpref specialises on the number of valid (non-prompt) tokens: the chunk
    loops of ``SequenceLogps`` run over Python ints derived from it, so dynamo guards on it and
    recompiles for every new count (until its recompile limit, 8, then that frame runs eagerly). Tiny
    warm-up batches cannot pre-compile the benchmark's count, so that row warms up on the full batch."""
    return contender == "fastpref" and mode == "compiled"


def make_dpo_step(contender: str, mode: str = "eager", preset: str = "h1024-v32k", dtype: str = "fp32",
                  prompt_frac: float = 0.0, seed: int = 0, warmup: bool = True,
                  n_tokens: Optional[int] = None, seq_len: Optional[int] = None,
                  threads: Optional[int] = None, full_warmup: Optional[bool] = None) -> Callable[[], None]:
    """Factory for :func:`fastpref.profiling.peak_memory_in_subprocess`: a zero-argument DPO training
    step (loss + backward w.r.t. hidden and weight) of ``contender`` in ``mode`` on a preset batch.

    ``full_warmup`` (default: :func:`needs_full_warmup`) runs one untimed step on the full batch instead
    of the tiny warm-ups; ``info["warmup_s"]`` is the time the warm-up took (compilation included)."""
    import time

    if threads:
        torch.set_num_threads(threads)
    why = contender_available(contender)
    if why:
        raise RuntimeError(why)
    inputs = preset_dpo_inputs(preset, dtype, prompt_frac, seed, n_tokens, seq_len)
    fn = loss_fn(contender, mode)
    if full_warmup is None:
        full_warmup = needs_full_warmup(contender, mode)
    t0 = time.perf_counter()
    if warmup and not full_warmup:
        _warm(fn, inputs, mode)
    if full_warmup:
        run_dpo(fn, inputs)
    info: Dict[str, Any] = {"n_tokens": inputs.labels.numel(), "n_valid": inputs.n_valid,
                            "n_pairs": inputs.n_pairs, "warmup": "tiny + full batch" if full_warmup else "tiny",
                            "warmup_s": time.perf_counter() - t0, "compiles_in_warmup": _compile_count()}
    compiles_before = _compile_count()

    info["cpu_times"] = []

    def step() -> None:
        c0 = time.process_time()
        loss, _, _ = run_dpo(fn, inputs)
        # CPU seconds of this process (all threads): less sensitive than wall time to other work on a
        # shared machine (though spin-waiting threads count too).
        info["cpu_times"].append(time.process_time() - c0)
        info["loss"] = float(loss)
        info["compiles_during_steps"] = _compile_count() - compiles_before

    step.info = info
    return step


def verify_agreement(preset: str = "h1024-v32k", dtype: str = "fp32", prompt_frac: float = 0.5,
                     n_tokens: Optional[int] = None, seq_len: Optional[int] = None,
                     contenders=CONTENDERS, modes=MODES, seed: int = 0,
                     threads: Optional[int] = None) -> Dict[str, Any]:
    """Loss and gradients of every contender/mode against the naive formula in fp64 on the same
    (already rounded) inputs. JSON-able: ``{"ref_loss": x, "results": {"contender/mode": {...}}}`` with
    ``loss``, ``loss_err`` (abs), ``grad_h_err`` / ``grad_w_err`` (max abs error divided by the max abs
    fp64 gradient), or ``error`` if the contender raised."""
    if threads:
        torch.set_num_threads(threads)
    inputs = preset_dpo_inputs(preset, dtype, prompt_frac, seed, n_tokens, seq_len)
    ref_loss, ref_gh, ref_gw = run_dpo(_naive_loss, inputs.to(torch.float64))
    out: Dict[str, Any] = {"ref_loss": float(ref_loss), "n_tokens": inputs.labels.numel(),
                           "shape": list(inputs.hidden.shape) + [inputs.weight.shape[0]], "results": {}}
    for c in contenders:
        if contender_available(c):
            continue
        for m in modes:
            try:
                loss, gh, gw = run_dpo(loss_fn(c, m), inputs)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                out["results"][f"{c}/{m}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            out["results"][f"{c}/{m}"] = {
                "loss": float(loss),
                "loss_err": abs(float(loss) - float(ref_loss)),
                "grad_h_err": float((gh.double() - ref_gh).abs().max() / ref_gh.abs().max()),
                "grad_w_err": float((gw.double() - ref_gw).abs().max() / ref_gw.abs().max()),
            }
    return out


def recompile_probe(contender: str, n_batches: int = 10, preset: str = "tiny", dtype: str = "fp32",
                    threads: Optional[int] = None) -> Dict[str, Any]:
    """Compiled ``contender`` on ``n_batches`` batches of the *same shape* whose prompt length (so the
    number of valid tokens) differs, as in training: per call, wall time and graphs compiled."""
    import time

    if threads:
        torch.set_num_threads(threads)
    fn = loss_fn(contender, "compiled")
    calls = []
    for i in range(n_batches):
        inputs = preset_dpo_inputs(preset, dtype, 0.2 + 0.5 * i / max(1, n_batches - 1), seed=i)
        g0 = _compile_count()
        t0 = time.perf_counter()
        run_dpo(fn, inputs)
        calls.append({"n_valid": inputs.n_valid, "time_s": time.perf_counter() - t0,
                      "new_graphs": _compile_count() - g0})
    return {"contender": contender, "preset": preset, "shape": shape_of(preset), "calls": calls}
