"""Scoring primitives for annotation with a frozen causal LM (inference mode; no ``[B, T, V]`` logits).

* :func:`fastpref.ops.restricted_logps` (re-exported here under its old name ``restricted_logprobs``):
  next-token log-probs of a few candidate tokens, normalised over the **full** vocabulary, holding one
  chunk of ``[rows, V]`` logits at a time.
* :class:`ScoringModel`: a model + its tokenizer, with

  - :meth:`~ScoringModel.sequence_logps`: ``log pi(y | x)`` (sum and token count) of many
    (prompt ids, response ids) pairs, batched, through :class:`fastpref.hf.FusedCausalLM`;
  - :meth:`~ScoringModel.candidate_logps` (formerly ``candidate_logprobs``, still accepted):
    ``log pi(c | prefix)`` for candidate *strings* ``c`` that may span several tokens (e.g. "10"):
    single-token candidates from one forward of the prefix and :func:`~fastpref.ops.restricted_logps`;
    a multi-token candidate is the sum of its conditionals
    ``sum_k log pi(c_k | prefix, c_<k)``, computed by the fused op over its tokens;
  - :meth:`~ScoringModel.generate`: greedy continuations (chain-of-thought rationales).

  Next-token scoring (:meth:`~ScoringModel.last_hidden`, hence single-token candidates: the RLAIF
  judge's "1"/"2") runs the token prefix common to a micro-batch once (``share_prefix``): the judge's
  instructions and few-shot exemplars are the same in every prompt, so they become the shared prompt of
  one :mod:`fastpref.step` group whose answers are the prompts' remaining tokens; the hidden state at each
  prompt's last token equals the unshared one to fp32 round-off.

Prompt and response are tokenised separately and concatenated, so the prompt boundary is exact for
every tokenizer (the official CDR code finds it by token count, which a BOS mismatch can shift by one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastpref.annotate.jsonl import RecordError
from fastpref.hf import FusedCausalLM
from fastpref.ops import sequence_logps
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES, IGNORE_INDEX
from fastpref.ops.restricted import restricted_logprobs, restricted_logprobs_ref, restricted_logps  # noqa: F401 - old names
from fastpref.step import Group, PreferenceStep

PromptLike = Union[str, List[dict]]
# Shared-prefix next-token scoring: shorter common prefixes are not worth a custom mask; a row holds at
# most SHARED_ROW_TOKENS tokens (the prefix + the suffixes that fit), which bounds its [L, L] mask.
MIN_SHARED_PREFIX = 16
SHARED_ROW_TOKENS = 2048


def move_trailing_space(text: str, candidates: Sequence[str]) -> Tuple[str, List[str]]:
    """``("SCORE: ", ["1"])`` -> ``("SCORE:", [" 1"])``: byte-level BPE tokenizers attach a space to the
    word after it, so a prompt ending in a space would end on a token the model rarely sees there."""
    stripped = text.rstrip(" ")
    space = text[len(stripped):]
    return stripped, [space + c for c in candidates]


@dataclass
class SequenceScores:
    """logps: [n] fp32 sums of response-token log-probs; counts: [n] int64 response tokens scored."""

    logps: Tensor
    counts: Tensor


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids)`` [b, T] of token lists padded on the left, so every
    sequence ends at column T-1 (where the next token is predicted); positions count real tokens only."""
    b, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((b, T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, s in enumerate(seqs):
        ids[k, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[k, T - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


class ScoringModel:
    """A frozen causal LM and its tokenizer, scoring in inference mode through the fused op.

    Args:
        model: any ``AutoModelForCausalLM`` whose logits are ``lm_head(last_hidden_state)`` (see
            :class:`fastpref.hf.FusedCausalLM`); put in eval mode here.
        tokenizer: its tokenizer (each model keeps its own).
        batch_size: sequences per forward pass.
        max_length: longest scored sequence; a longer prompt loses its start (at least one prompt token
            is kept), a response that does not fit is a per-record error. None: the model's
            ``max_position_embeddings`` (no limit if the config has none).
        chat_template: ``"auto"`` (use the tokenizer's chat template when it has one), ``"on"`` or ``"off"``.
        backend, chunk_bytes: passed to the fused op.
        share_prefix: next-token scoring runs a micro-batch's common token prefix once (module
            docstring); a model that cannot take the prefix-sharing mask falls back with one line.
    """

    def __init__(self, model, tokenizer, *, name: Optional[str] = None, batch_size: int = 8,
                 max_length: Optional[int] = None, chat_template: str = "auto", backend: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, share_prefix: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if chat_template not in ("auto", "on", "off"):
            raise ValueError(f"chat_template: expected auto, on or off, got {chat_template!r}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template == "on" and not has_template:
            raise ValueError(f"{name or 'model'}: chat_template='on' but the tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__
        self.batch_size = batch_size
        self.max_length = max_length if max_length is not None else getattr(
            getattr(model, "config", None), "max_position_embeddings", None)
        self.backend = backend
        self.fused = FusedCausalLM(model, backend=backend, chunk_bytes=chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.share_prefix = bool(share_prefix)
        self._prefix_step: Optional[PreferenceStep] = None  # built on first use (it probes the model)
        self.use_chat = chat_template == "on" or (chat_template == "auto" and has_template)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        self.bos_id = bos if adds_bos else None  # plain-text prompts get it the way the tokenizer would add it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- text -> ids ------------------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def render(self, prompt: PromptLike) -> str:
        """The prompt as the text the model is conditioned on, up to where the response starts.

        Chat mode: the chat template with ``add_generation_prompt=True`` (a plain string is one user
        turn). Plain mode: a string as is; messages as ``Role: content`` paragraphs ending in
        ``Assistant:`` and a newline."""
        if self.use_chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - templates raise anything (e.g. no system role)
                raise RecordError(f"{self.name}: the chat template cannot render this prompt "
                                  f"({type(exc).__name__}: {exc})") from None
        if isinstance(prompt, str):
            return prompt
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
        return "\n\n".join(parts + ["Assistant:\n"])

    def prompt_ids(self, text: str) -> List[int]:
        """Ids of a rendered prompt: chat-rendered text carries its own special tokens; plain text gets
        the BOS the tokenizer would add."""
        ids = self.encode(text)
        if not self.use_chat and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def fit(self, prompt: Sequence[int], response: Sequence[int]) -> List[int]:
        """Check a (prompt, response) pair against ``max_length``; returns the (left-truncated) prompt.
        Raises :class:`RecordError` when nothing can be scored."""
        prompt = list(prompt)
        if not response:
            raise RecordError(f"{self.name}: empty response (no token to score)")
        if not prompt:
            raise RecordError(f"{self.name}: empty prompt and no BOS token: the first response token has no context")
        if self.max_length is not None and len(prompt) + len(response) > self.max_length:
            if len(response) >= self.max_length:
                raise RecordError(f"{self.name}: response of {len(response)} tokens does not fit in "
                                  f"max_length={self.max_length} with a prompt token")
            prompt = prompt[len(prompt) + len(response) - self.max_length:]
        return prompt

    def check_prefix(self, prefix: Sequence[int], extra: int = 0) -> None:
        """Raise :class:`RecordError` when ``prefix`` plus ``extra`` tokens exceed ``max_length`` (judge
        prompts are never truncated: their start holds the instructions)."""
        if self.max_length is not None and len(prefix) + extra > self.max_length:
            raise RecordError(f"{self.name}: prompt of {len(prefix)} tokens (+{extra}) exceeds "
                              f"max_length={self.max_length}")

    # -- scoring ----------------------------------------------------------------------------------

    def _order(self, lengths: Sequence[int]) -> List[List[int]]:
        """Micro-batches of indices, longest first (less padding); deterministic for given lengths."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _pad_right(self, seqs: Sequence[Sequence[int]], labels: Optional[Sequence[Sequence[int]]] = None):
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
            if labels is not None:
                lab[i, :len(s)] = torch.tensor(labels[i], dtype=torch.long)
        dev = self.device
        return ids.to(dev), lab.to(dev), mask.to(dev)

    @torch.inference_mode()
    def sequence_logps(self, items: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> SequenceScores:
        """``log pi(response | prompt)`` for ``(prompt ids, response ids)`` pairs.

        Returns :class:`SequenceScores` on the CPU: ``logps[i] = sum_t log pi(r_t | prompt, r_<t)`` over
        the response tokens of item i (fp32), ``counts[i] = len(response)``. Equivalent to
        ``log_softmax(model(prompt + response).logits)`` gathered at the response tokens, but the fused
        op never builds the ``[B, T, V]`` logits."""
        n = len(items)
        logps = torch.zeros(n, dtype=torch.float32)
        counts = torch.zeros(n, dtype=torch.long)
        for batch in self._order([len(p) + len(r) for p, r in items]):
            seqs = [list(items[i][0]) + list(items[i][1]) for i in batch]
            labels = [[IGNORE_INDEX] * len(items[i][0]) + list(items[i][1]) for i in batch]
            ids, lab, mask = self._pad_right(seqs, labels)
            out = self.fused(ids, labels=lab, attention_mask=mask)
            logps[batch] = out.logps.float().cpu()
            counts[batch] = out.counts.cpu()
        return SequenceScores(logps, counts)

    @torch.inference_mode()
    def last_hidden(self, prefixes: Sequence[Sequence[int]]) -> Tensor:
        """[n, H] final hidden state at the last token of each prefix (it predicts the next token)."""
        out = None
        for batch in self._order([len(p) for p in prefixes]):
            seqs = [list(prefixes[i]) for i in batch]
            rows = self._shared_last_hidden(seqs)
            if rows is None:
                ids, _, mask = self._pad_right(seqs)
                hidden = self.fused.hidden_states(ids, mask)  # right padding: default positions are right
                last = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
                rows = hidden[torch.arange(len(seqs), device=hidden.device), last]
            if out is None:
                out = rows.new_empty(len(prefixes), rows.shape[-1])
            out[torch.tensor(batch, device=rows.device)] = rows
        return out

    def _shared_last_hidden(self, seqs: List[List[int]]) -> Optional[Tensor]:
        """Last-token hidden rows of ``seqs`` with their common prefix run once; None when sharing is off,
        not worth it, or the model cannot take the layout (then the caller pads)."""
        if not self.share_prefix or len(seqs) < 2:
            return None
        c = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1)  # every suffix keeps a token
        if c < MIN_SHARED_PREFIX:
            return None
        step = self._step()
        if step is None:
            return None
        # suffixes in groups that fit a row with the prefix; each gets one extra (pad) token so that the
        # row of its last real token is the one predicting a label: the op inputs' largest row per sequence
        groups: List[List[int]] = [[]]
        used = c
        for k, s in enumerate(seqs):
            if groups[-1] and used + len(s) - c + 1 > SHARED_ROW_TOKENS:
                groups.append([])
                used = c
            groups[-1].append(k)
            used += len(s) - c + 1
        packed = step.pack_groups([Group(seqs[0][:c], [seqs[k][c:] + [self.pad_id] for k in g]) for g in groups],
                                  order="group_major")
        hidden = step.hidden_states(packed)
        last = torch.full((packed.num_seqs,), -1, dtype=torch.long, device=packed.rows.device)
        last = last.scatter_reduce(0, packed.seq_ids, packed.rows, reduce="amax")
        order = torch.tensor([k for g in groups for k in g], device=last.device)  # sequence id -> seqs index
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last)
        return rows.index_select(0, torch.argsort(order))

    def _step(self) -> Optional[PreferenceStep]:
        if self._prefix_step is None:
            import sys

            self._prefix_step = PreferenceStep(
                self.fused, share_prompt=True, max_tokens_per_row=SHARED_ROW_TOKENS, precision="fp32",
                pad_token_id=self.pad_id, log=lambda line: print(f"{self.name}: {line}", file=sys.stderr))
        return self._prefix_step if self._prefix_step.layout == "shared" else None

    def next_token_logps(self, prefixes: Sequence[Sequence[int]], token_ids: Sequence[int]) -> Tensor:
        """[n, C] ``log pi(token | prefix)`` normalised over the full vocabulary (CPU, fp32)."""
        weight, bias = self.fused.head()
        hidden = self.last_hidden(prefixes)
        with torch.inference_mode():
            lp = restricted_logps(hidden, weight, token_ids, bias=bias, temperature=self.fused.temperature,
                                  backend=self.backend, chunk_bytes=self.chunk_bytes)
        return lp.float().cpu()

    def candidate_logps(self, prefixes: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> Tensor:
        """[n, C] ``log pi(candidate | prefix)`` for candidate token sequences (CPU, fp32).

        The first token of every candidate comes from one forward of each prefix and
        :func:`~fastpref.ops.restricted_logps` (full-vocabulary normaliser). A longer candidate adds
        ``sum_{k>=2} log pi(c_k | prefix, c_<k)`` (the product of the conditionals): its tokens run
        through the model after the prefix's KV cache, repeated once per candidate, and the fused op
        scores them. Without cache support (no ``position_ids`` / cache API), each ``prefix + candidate``
        is scored from scratch instead (same values, more compute)."""
        if any(len(c) == 0 for c in candidates):
            raise ValueError("candidates: every candidate needs at least one token")
        n, C = len(prefixes), len(candidates)
        single = [j for j, c in enumerate(candidates) if len(c) == 1]
        multi = [j for j, c in enumerate(candidates) if len(c) > 1]
        out = torch.empty(n, C, dtype=torch.float32)
        if not multi:
            out[:] = self.next_token_logps(prefixes, [c[0] for c in candidates])
            return out
        if self._accepts_position_ids:
            cached = self._candidates_cached(prefixes, candidates, multi)
            if cached is not None:
                return cached
        if single:
            out[:, single] = self.next_token_logps(prefixes, [candidates[j][0] for j in single])
        items = [(prefixes[i], candidates[j]) for i in range(n) for j in multi]
        out[:, multi] = self.sequence_logps(items).logps.view(n, len(multi))
        return out

    @property
    def _accepts_position_ids(self) -> bool:
        import inspect

        params = inspect.signature(self.fused.backbone.forward).parameters
        return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    # The former names (``logprobs``); ``logps`` is the package's word for log-probabilities.
    next_token_logprobs = next_token_logps
    candidate_logprobs = candidate_logps

    @torch.inference_mode()
    def _candidates_cached(self, prefixes, candidates, multi) -> Optional[Tensor]:
        """The KV-cache path of :meth:`candidate_logps`; None when the model returns no usable cache."""
        weight, bias = self.fused.head()
        first = [c[0] for c in candidates]
        M, L = len(multi), max(len(candidates[j]) for j in multi) - 1
        out = torch.empty(len(prefixes), len(candidates), dtype=torch.float32)
        dev = self.device
        for batch in self._order([len(p) for p in prefixes]):
            seqs = [list(prefixes[i]) for i in batch]
            ids, mask, pos = left_padded(seqs, self.pad_id, dev)
            b = ids.shape[0]
            res = self.fused.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            cache = getattr(res, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None
            lp_first = restricted_logps(res.last_hidden_state[:, -1], weight, first, bias=bias,
                                           temperature=self.fused.temperature, backend=self.backend,
                                           chunk_bytes=self.chunk_bytes).float().cpu()
            cache.batch_repeat_interleave(M)  # row k*M + m: prefix k followed by candidate multi[m]
            cont = torch.full((b * M, L), self.pad_id, dtype=torch.long)
            labels = torch.full((b * M, L), IGNORE_INDEX, dtype=torch.long)
            cmask = torch.zeros((b * M, L), dtype=torch.long)
            for k in range(b):
                for m, j in enumerate(multi):
                    toks = list(candidates[j])
                    cont[k * M + m, :len(toks) - 1] = torch.tensor(toks[:-1])
                    labels[k * M + m, :len(toks) - 1] = torch.tensor(toks[1:])  # hidden at c_i predicts c_{i+1}
                    cmask[k * M + m, :len(toks) - 1] = 1
            lengths = mask.sum(-1).repeat_interleave(M)
            att = torch.cat([mask.repeat_interleave(M, dim=0), cmask.to(dev)], dim=1)
            pos = lengths[:, None] + torch.arange(L, device=dev)
            hidden = self.fused.backbone(input_ids=cont.to(dev), attention_mask=att, position_ids=pos,
                                         past_key_values=cache, use_cache=True).last_hidden_state
            rest = sequence_logps(hidden, weight, labels.to(dev), bias=bias, temperature=self.fused.temperature,
                                  backend=self.backend, chunk_bytes=self.chunk_bytes).logps.float().cpu()
            idx = torch.tensor(batch)
            out[idx] = lp_first
            out[idx[:, None], torch.tensor(multi)[None, :]] += rest.view(b, M)
        return out

    @torch.inference_mode()
    def generate(self, prefixes: Sequence[Sequence[int]], max_new_tokens: int = 512) -> List[str]:
        """Greedy (temperature 0) continuations of token-id prefixes, decoded without special tokens;
        generation stops at the EOS token."""
        texts: List[Optional[str]] = [None] * len(prefixes)
        for batch in self._order([len(p) for p in prefixes]):
            seqs = [list(prefixes[i]) for i in batch]
            ids, mask, _ = left_padded(seqs, self.pad_id, self.device)  # new tokens follow every prompt directly
            T = ids.shape[1]
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_id)
            for k, i in enumerate(batch):
                texts[i] = self.tokenizer.decode(out[k, T:], skip_special_tokens=True)
        return texts
