"""Preference data: TRL-format JSONL, tokenisation with prompt masking, truncation and collation.

Two record formats (one JSON object per line; detected per file, or forced with ``format=``):

* **paired**: ``{"prompt": ..., "chosen": ..., "rejected": ...}``.
* **point-wise** (KTO / ULMA): ``{"prompt": ..., "completion": ..., "label": true | false | 0.7}``.

Each text field is a string (standard format) or a list of ``{"role", "content"}`` messages
(conversational format, rendered with the tokenizer's chat template: the prompt with
``add_generation_prompt=True``, the response as the rest of the rendered conversation). A
conversational paired record may omit ``prompt``: the longest common prefix of the ``chosen`` and
``rejected`` message lists is the prompt (TRL's "implicit prompt"). Optional precomputed reference
log-prob sums: ``ref_chosen_logps``/``ref_rejected_logps`` (paired), ``ref_logps`` (point-wise).

Tokenisation: prompt tokens get label -100. Plain text: the prompt gets the tokenizer's BOS when the
tokenizer adds one by itself, and EOS is appended to every response unless it already ends with it.
Conversational records tokenise exactly as TRL 1.16's ``DPOTrainer`` does: each whole conversation
and the prompt (with ``add_generation_prompt=True``) go through the chat template, the prompt is their
common token prefix, and each response is the rest as the template renders it (its end-of-turn token
and the newline after it included, no EOS added).

Truncation (per example, identical prompt for chosen and rejected):
``max_prompt_length`` cuts the prompt (``keep_end``: keep its last tokens; ``keep_start``: its
first), ``max_completion_length`` cuts each response's end, then ``max_length`` bounds
prompt + longest response: ``keep_end`` drops prompt tokens from the left (keeping at least one),
then cuts response ends; ``keep_start`` keeps the start of the sequence and cuts response ends.
An example left without a response token (e.g. ``keep_start`` with a prompt of ``max_length`` tokens:
cap it with ``max_prompt_length``) is an error, never a silent zero.

Malformed records raise :class:`DataError` with file and line number; with ``skip_invalid=True``
they are skipped, counted and listed in the :class:`LoadReport` instead.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch

from fastpref.errors import InputError
from fastpref.ops.constants import IGNORE_INDEX

FORMATS = ("paired", "pointwise")
TRUNCATION_MODES = ("keep_end", "keep_start")


class DataError(InputError):
    """A malformed training record (the message names the file and line)."""


@dataclass(frozen=True)
class TokenizeOptions:
    """How records become token ids (see the module docstring)."""

    max_length: Optional[int] = 1024
    max_prompt_length: Optional[int] = 512
    max_completion_length: Optional[int] = None
    truncation_mode: str = "keep_end"
    add_eos: bool = True

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length: needs room for a prompt token and a response token, got {self.max_length}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode: expected one of {', '.join(TRUNCATION_MODES)}, got {self.truncation_mode!r}")


@dataclass
class LoadReport:
    """What :func:`load_preferences` read: ``loaded`` examples, ``skipped`` as ``(line, reason)``."""

    source: str
    format: str
    loaded: int = 0
    truncated: int = 0
    skipped: List[Tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: {self.loaded} {self.format} examples"
        if self.truncated:
            text += f", {self.truncated} truncated"
        if self.skipped:
            first = "; ".join(f"line {line}: {why}" for line, why in self.skipped[:3])
            text += f", {len(self.skipped)} invalid skipped ({first}{' ...' if len(self.skipped) > 3 else ''})"
        return text


# ---------------------------------------------------------------------------------------------
# reading and validating records


def read_jsonl(path: Union[str, Path]) -> List[Tuple[int, Any]]:
    """``(line number, parsed JSON or DataError)`` for every non-blank line; bad JSON is an error value
    (so ``skip_invalid`` can count it) rather than an exception here; bytes that are not UTF-8 too
    (``not valid UTF-8 (byte 0xff at column 7)``, see :mod:`fastpref.jsonio`)."""
    from fastpref.jsonio import iter_jsonl

    return [(lineno, DataError(err) if err is not None else value) for lineno, value, err in iter_jsonl(path)]


def _is_messages(value) -> bool:
    return isinstance(value, list)


def check_messages(name: str, value: Any, *, error: Optional[Type[InputError]] = None) -> List[Dict[str, str]]:
    """``value`` must be a non-empty list of ``{'role': str, 'content': str}`` chat messages; returns
    it. Raises ``error`` (default :class:`DataError`; annotation passes its ``RecordError``) naming
    the field ``name`` and the index of a bad message."""
    error = error or DataError
    if not isinstance(value, list) or not value:
        raise error(f"{name!r}: expected a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise error(f"{name!r}[{i}]: expected {{'role': str, 'content': str}}, got {msg!r:.80}")
    return value


def _check_text(name: str, value, allow_empty: bool = False) -> None:
    if _is_messages(value):
        check_messages(name, value)
    elif isinstance(value, str):
        if not value and not allow_empty:
            raise DataError(f"{name!r}: empty string")
    else:
        raise DataError(f"{name!r}: expected a string or a list of messages, got {type(value).__name__}")


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{name!r}: expected a finite number, got {value!r}")
    return float(value)


def detect_format(record: Dict[str, Any]) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return "paired"
    if "completion" in record or "label" in record:
        return "pointwise"
    raise DataError(f"cannot tell the format: expected keys prompt/chosen/rejected or prompt/completion/label, "
                    f"got {sorted(record)}")


def _common_prefix(a: List[dict], b: List[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def validate_record(record: Any, fmt: str) -> Dict[str, Any]:
    """Check ``record`` against ``fmt``; returns a normalised copy (implicit prompts made explicit,
    point-wise labels as floats)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    rec = dict(record)
    if fmt == "paired":
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise DataError(f"missing key {key!r} (paired format: prompt, chosen, rejected)")
        if "prompt" not in rec:
            if not (_is_messages(rec["chosen"]) and _is_messages(rec["rejected"])):
                raise DataError("missing key 'prompt' (only conversational records may leave the prompt implicit)")
            check_messages("chosen", rec["chosen"])
            check_messages("rejected", rec["rejected"])
            n = _common_prefix(rec["chosen"], rec["rejected"])
            if n == 0:
                raise DataError("no 'prompt' and chosen/rejected share no leading messages")
            if n == len(rec["chosen"]) or n == len(rec["rejected"]):
                raise DataError("no 'prompt' and chosen or rejected has no message after the shared prefix")
            rec["prompt"], rec["chosen"], rec["rejected"] = rec["chosen"][:n], rec["chosen"][n:], rec["rejected"][n:]
        keys = ("prompt", "chosen", "rejected")
        _check_text("prompt", rec["prompt"], allow_empty=True)
        _check_text("chosen", rec["chosen"])
        _check_text("rejected", rec["rejected"])
        refs = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k in rec]
        if len(refs) == 1:
            raise DataError(f"{refs[0]!r} given without its counterpart")
        for k in refs:
            rec[k] = _check_number(k, rec[k])
    elif fmt == "pointwise":
        for key in ("prompt", "completion", "label"):
            if key not in rec:
                raise DataError(f"missing key {key!r} (point-wise format: prompt, completion, label)")
        keys = ("prompt", "completion")
        _check_text("prompt", rec["prompt"], allow_empty=True)
        _check_text("completion", rec["completion"])
        label = rec["label"]
        rec["label"] = float(label) if isinstance(label, bool) else _check_number("label", label)
        if "ref_logps" in rec:
            rec["ref_logps"] = _check_number("ref_logps", rec["ref_logps"])
    else:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    kinds = {_is_messages(rec[k]) for k in keys if not (k == "prompt" and rec[k] == "")}
    if len(kinds) > 1:
        raise DataError("mixes plain text and message lists; use one or the other for every field")
    return rec


# ---------------------------------------------------------------------------------------------
# tokenisation


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


class _Encoder:
    """Turns one validated record's fields into token-id lists."""

    def __init__(self, tokenizer, opts: TokenizeOptions):
        self.tok = tokenizer
        self.opts = opts
        self.bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id
        if opts.add_eos and self.eos is None:
            raise ValueError("add_eos: the tokenizer has no eos_token; set add_eos=False or give it one")

    def _ids(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _finish(self, ids: List[int]) -> List[int]:
        if self.opts.add_eos and (not ids or ids[-1] != self.eos):
            ids = ids + [self.eos]
        return ids

    def _chat_ids(self, messages, add_generation_prompt: bool = False) -> List[int]:
        out = self.tok.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                           add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"])

    def conversation(self, prompt, responses) -> Tuple[List[int], List[List[int]]]:
        """Chat records, token for token as TRL 1.16 does it: the prompt rendered with
        ``add_generation_prompt=True`` and each whole conversation (prompt + response) are tokenised by
        the chat template; the prompt is their longest common token prefix (over all responses, so it
        is the same for chosen and rejected) and each response is the rest of its conversation, as the
        template renders it -- end-of-turn token and the newline after it included, no EOS added."""
        if getattr(self.tok, "chat_template", None) is None:
            raise DataError("conversational record but the tokenizer has no chat template")
        prompt_ids = self._chat_ids(prompt, add_generation_prompt=True)
        full = [self._chat_ids(list(prompt) + list(r)) for r in responses]
        n = min(_common_prefix(prompt_ids, ids) for ids in full)
        return prompt_ids[:n], [ids[n:] for ids in full]

    def prompt(self, prompt) -> List[int]:
        """Plain-text prompt ids (BOS first when the tokenizer adds one by itself)."""
        ids = self._ids(prompt) if prompt else []
        return [self.bos] + ids if self.bos is not None else ids

    def response(self, response: str) -> List[int]:
        """Plain-text response ids, EOS-terminated (``add_eos``)."""
        return self._finish(self._ids(response))


def _truncate(prompt: List[int], responses: List[List[int]], opts: TokenizeOptions):
    """Apply the truncation rules (module docstring); returns ``(prompt, responses, truncated?)``."""
    orig = (len(prompt), [len(r) for r in responses])
    keep_end = opts.truncation_mode == "keep_end"
    if opts.max_prompt_length is not None and len(prompt) > opts.max_prompt_length:
        prompt = prompt[-opts.max_prompt_length:] if keep_end else prompt[:opts.max_prompt_length]
    if opts.max_completion_length is not None:
        responses = [r[:opts.max_completion_length] for r in responses]
    L = opts.max_length
    if L is not None:
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > L:
            if keep_end:
                keep = min(len(prompt), max(1, L - longest))
                prompt = prompt[len(prompt) - keep:]
            responses = [r[:L - len(prompt)] for r in responses]
    if any(not r for r in responses):
        raise DataError(f"no response token left after truncation (prompt {orig[0]} tokens, responses {orig[1]}, "
                        f"max_length={opts.max_length}, max_prompt_length={opts.max_prompt_length})")
    return prompt, responses, (len(prompt), [len(r) for r in responses]) != orig


def tokenize_record(rec: Dict[str, Any], fmt: str, encoder: _Encoder) -> Tuple[Dict[str, Any], bool]:
    """One validated record -> token ids (``prompt_ids`` plus ``chosen_ids``/``rejected_ids`` or
    ``completion_ids``/``label``, and reference columns when present)."""
    names = ("chosen", "rejected") if fmt == "paired" else ("completion",)
    if _is_messages(rec[names[0]]):
        prompt_ids, responses = encoder.conversation(rec["prompt"] or [], [rec[n] for n in names])
    else:
        prompt_ids = encoder.prompt(rec["prompt"])
        responses = [encoder.response(rec[n]) for n in names]
    prompt_ids, responses, truncated = _truncate(prompt_ids, responses, encoder.opts)
    ex = {"prompt_ids": prompt_ids}
    for n, ids in zip(names, responses):
        ex[f"{n}_ids"] = ids
    for key in ("label", "ref_chosen_logps", "ref_rejected_logps", "ref_logps"):
        if key in rec:
            ex[key] = rec[key]
    return ex, truncated


# ---------------------------------------------------------------------------------------------
# dataset


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised examples (lists of python ints) of one format, plus the load report."""

    def __init__(self, examples: List[Dict[str, Any]], fmt: str, report: Optional[LoadReport] = None):
        if fmt not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.examples = examples
        self.format = fmt
        self.report = report or LoadReport("<memory>", fmt, loaded=len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.examples[i]

    @property
    def has_reference(self) -> bool:
        key = "ref_chosen_logps" if self.format == "paired" else "ref_logps"
        return bool(self.examples) and all(key in ex for ex in self.examples)

    def split(self, eval_fraction: float, seed: int = 0) -> Tuple["PreferenceDataset", "PreferenceDataset"]:
        """Seeded random split into ``(train, eval)``; ``eval`` gets ``round(n * eval_fraction)`` (>= 1)."""
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {eval_fraction!r}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * eval_fraction))
        if n_eval >= len(order):
            raise ValueError(f"eval_fraction: {eval_fraction} leaves no training example out of {len(order)}")
        pick = lambda idx: [self.examples[i] for i in sorted(idx)]  # noqa: E731
        return (PreferenceDataset(pick(order[n_eval:]), self.format),
                PreferenceDataset(pick(order[:n_eval]), self.format))

    def num_tokens(self) -> int:
        keys = ("chosen_ids", "rejected_ids") if self.format == "paired" else ("completion_ids",)
        return sum(len(ex["prompt_ids"]) * len(keys) + sum(len(ex[k]) for k in keys) for ex in self.examples)


def load_preferences(
    source: Union[str, Path, Iterable[Dict[str, Any]]],
    tokenizer,
    *,
    format: str = "auto",
    max_length: Optional[int] = 1024,
    max_prompt_length: Optional[int] = 512,
    max_completion_length: Optional[int] = None,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
    kl_pairs: bool = False,
) -> PreferenceDataset:
    """Read (a JSONL path or an iterable of dicts), validate and tokenise preference records.

    ``format``: ``"paired"``, ``"pointwise"`` or ``"auto"`` (from the first valid record; every record
    must then have that format). ``kl_pairs`` (point-wise only, for KTO): give example ``i`` the
    mismatched completion of example ``i-1`` (mod n) as ``kl_completion_ids``, the fixed pairing TRL's
    KTO builds at data-preparation time. Returns a :class:`PreferenceDataset` whose ``report`` counts
    what was loaded, truncated and (with ``skip_invalid``) skipped."""
    opts = TokenizeOptions(max_length, max_prompt_length, max_completion_length, truncation_mode, add_eos)
    if format not in FORMATS + ("auto",):
        raise ValueError(f"format: expected 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    if isinstance(source, (str, Path)):
        name = str(source)
        rows = read_jsonl(source)
        where = lambda line: f"{name}:{line}"  # noqa: E731
    else:
        name = "<records>"
        rows = list(enumerate(source, 1))
        where = lambda line: f"record {line}"  # noqa: E731
    encoder = _Encoder(tokenizer, opts)
    fmt = None if format == "auto" else format
    examples, report = [], LoadReport(name, format)
    for line, rec in rows:
        try:
            if isinstance(rec, DataError):
                raise rec
            if fmt is None:
                fmt = detect_format(rec)
                report.format = fmt
            elif format == "auto" and isinstance(rec, dict):
                found = detect_format(rec)
                if found != fmt:
                    raise DataError(f"{found} record in a {fmt} file")
            ex, truncated = tokenize_record(validate_record(rec, fmt), fmt, encoder)
        except DataError as exc:
            if not skip_invalid:
                raise DataError(f"{where(line)}: {exc}") from None
            report.skipped.append((line, str(exc)))
            continue
        ex["line"] = line
        examples.append(ex)
        report.truncated += truncated
    if not examples:
        raise DataError(f"{name}: no valid record" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    report.loaded = len(examples)
    if kl_pairs:
        if fmt != "pointwise":
            raise ValueError("kl_pairs: only for point-wise data (KTO)")
        for i, ex in enumerate(examples):
            prompt, (kl,), _ = _truncate(list(ex["prompt_ids"]), [examples[i - 1]["completion_ids"]], opts)
            ex["kl_prompt_ids"], ex["kl_completion_ids"] = prompt, kl
    return PreferenceDataset(examples, fmt, report)


# ---------------------------------------------------------------------------------------------
# collation


def _sequence(prompt: Sequence[int], response: Sequence[int]) -> Tuple[List[int], List[int]]:
    return list(prompt) + list(response), [IGNORE_INDEX] * len(prompt) + list(response)


class PreferenceCollator:
    """Examples -> model-ready tensors.

    Paired examples become ``2B`` sequences, chosen rows ``[0, B)`` then rejected rows ``[B, 2B)``
    (pair i = rows i and B+i); point-wise examples ``B`` sequences plus ``sample_labels`` [B] (and, with
    KL pairs, the same keys prefixed ``kl_``).

    Padded (default): ``input_ids``, ``attention_mask``, ``labels`` [S, T] (``padding_side`` right or
    left, T rounded up to ``pad_to_multiple_of``). Packed (``packed=True``, padding-free):
    ``input_ids``/``labels``/``position_ids`` [1, N] (positions restart at 0 per sequence), ``seq_ids``
    [N], ``cu_seqlens`` [S+1] int32, ``max_seqlen`` and ``num_seqs`` (ints). Labels are unshifted (-100
    on prompt and padding). Also: ``ref_logps`` [S] (and ``ref_kl_logps``) when every example carries
    reference sums, ``num_tokens`` (int, non-padding tokens) and ``index`` [B] example indices when the
    examples have one.
    """

    def __init__(self, pad_token_id: int, *, packed: bool = False, padding_side: str = "right",
                 pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id: required (use the tokenizer's pad or eos id)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.packed = packed
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _tensors(self, seqs: List[Tuple[List[int], List[int]]], prefix: str = "") -> Dict[str, Any]:
        if self.packed:
            ids = [t for s, _ in seqs for t in s]
            labels = [t for _, lab in seqs for t in lab]
            lengths = [len(s) for s, _ in seqs]
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            return {
                prefix + "input_ids": torch.tensor([ids], dtype=torch.long),
                prefix + "labels": torch.tensor([labels], dtype=torch.long),
                prefix + "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long),
                prefix + "seq_ids": torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], dtype=torch.long),
                prefix + "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                prefix + "max_seqlen": max(lengths),
                prefix + "num_seqs": len(seqs),
            }
        T = max(len(s) for s, _ in seqs)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (s, lab) in enumerate(seqs):
            n = len(s)
            sl = slice(0, n) if self.padding_side == "right" else slice(T - n, T)
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            labels[i, sl] = torch.tensor(lab, dtype=torch.long)
            mask[i, sl] = 1
        return {prefix + "input_ids": ids, prefix + "attention_mask": mask, prefix + "labels": labels}

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        paired = "chosen_ids" in examples[0]
        if paired:
            seqs = [_sequence(ex["prompt_ids"], ex["chosen_ids"]) for ex in examples]
            seqs += [_sequence(ex["prompt_ids"], ex["rejected_ids"]) for ex in examples]
            ref_keys = ("ref_chosen_logps", "ref_rejected_logps")
        else:
            seqs = [_sequence(ex["prompt_ids"], ex["completion_ids"]) for ex in examples]
            ref_keys = ("ref_logps",)
        batch = self._tensors(seqs)
        batch["num_tokens"] = sum(len(s) for s, _ in seqs)
        if not paired:
            batch["sample_labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.float32)
            if "kl_completion_ids" in examples[0]:
                kl = [_sequence(ex["kl_prompt_ids"], ex["kl_completion_ids"]) for ex in examples]
                batch.update(self._tensors(kl, prefix="kl_"))
                if all("ref_kl_logps" in ex for ex in examples):
                    batch["ref_kl_logps"] = torch.tensor([ex["ref_kl_logps"] for ex in examples], dtype=torch.float32)
        have = [all(k in ex for ex in examples) for k in ref_keys]
        if all(have):
            batch["ref_logps"] = torch.tensor([ex[k] for k in ref_keys for ex in examples], dtype=torch.float32)
        if all("index" in ex for ex in examples):
            batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return batch
