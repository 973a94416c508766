"""CDR: preference annotation by the density ratio of a strong over a weak LLM (docs/methods.md#cdr).

Reward (Xu et al., arXiv 2411.02481, Eq. 2)::

    r(x, y) = log pi_strong(y | T(x)) - log pi_weak(y | T(x))        normalize="none" (official code)
    r(x, y) = [log pi_strong(y | T(x)) - log pi_weak(y | T(x))] / |y|_strong    normalize="mean" (reward_hub)

with sums over the response tokens under each model's *own* tokenizer; ``|y|_strong`` counts the strong
model's response tokens (when both models share a tokenizer this is ``mean_strong - mean_weak``).
``T(x)`` is the customised prompt: optional system prompt (criteria), optional in-context block of
good/bad exemplars prepended to the last user turn (which then ends in ``"\\nGood Assistant:"``), then
each model's chat template (or the strong model's rendering for both: ``shared_template``).

EOS: with ``eos="include"`` (default) the tokenizer's EOS token is appended to every response and
scored, so the reward also judges where the response stops (the official code always appends EOS);
``"exclude"`` scores the response tokens only.

Domain routing (docs/methods.md#cdr-routing): a labeler model classifies each prompt as SAFETY, REASONING or CHAT by
restricted-vocabulary scoring of the three names after a ``Category:`` cue (normalised over the full
vocabulary, then over the three); below ``route_min_prob``, without a router, or for an invalid
``domain`` field in the record, the prompt falls back to CHAT. Per-domain guidance defaults to the
official demo setting: CHAT vanilla, SAFETY/REASONING an empty system turn plus one exemplar block
drawn at random (seeded by the record's line).

Pairs (docs/methods.md#cdr-pairs) from N >= 2 candidates: chosen = the best (first on ties); rejected = uniformly random
among the others that are strictly worse *and* differ in text from the chosen one (``pairs="random"``,
seeded per input line), or the worst (``pairs="worst"``). A prompt whose candidates all tie, or whose
best has no strictly worse distinct competitor, is skipped. The official code draws from all N-1 and
drops the prompt when the draw ties or duplicates; excluding those up front keeps more prompts and
never emits a pair without a preference.

Scoring (docs/methods.md#cdr): all candidates of a prompt run under each model in one shared-prompt
segment ``[T(x) | y_1 | ... | y_N]`` (:mod:`fastpref.step.packing`; ``share_prompt``), many prompts packed
per row, so the long customised prompt (criteria, exemplars) runs once per model instead of N times; the
sums equal scoring every ``T(x) + y_i`` alone. ``precision``: ``fp32`` (default), ``bf16-mixed`` or ``auto``.
"""
from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from fastpref.annotate import prompts as P
from fastpref.annotate.jsonl import RecordError
from fastpref.annotate.records import (
    PromptLike,
    as_response,
    extras,
    get_prompt,
    query_text,
    response_list,
    response_text,
)
from fastpref.annotate.runner import Annotator, Outcome
from fastpref.annotate.scoring import ScoringModel, SequenceScores, move_trailing_space
from fastpref.step import Group, PreferenceStep, resolve_precision
from fastpref.step.packing import DEFAULT_MAX_TOKENS_PER_ROW

DOMAINS = P.DOMAINS
NORMALIZE = ("none", "mean")
EOS_MODES = ("include", "exclude")
PAIR_MODES = ("random", "worst")
RESPONSE_KEYS = ("responses", "completions", "candidates")


# ---------------------------------------------------------------------------------------------
# guidance: system prompt + in-context exemplars


@dataclass(frozen=True)
class Exemplar:
    """One worked example: a request, a good and a bad answer, and why."""

    prompt: str
    good: str
    bad: str
    explanation: str = ""


@dataclass(frozen=True)
class ExemplarBlock:
    """A criterion and one or more exemplars illustrating it (one block is shown per prompt)."""

    criterion: str = ""
    examples: Tuple[Exemplar, ...] = ()

    def render(self) -> str:
        parts = [self.criterion] if self.criterion else []
        for ex in self.examples:
            text = f"User: {ex.prompt}\nGood Assistant: {ex.good}\nBad Assistant: {ex.bad}"
            if ex.explanation:
                text += f"\nExplanation: {ex.explanation}"
            parts.append(text)
        return "\n\n".join(parts)


@dataclass(frozen=True)
class Guidance:
    """How ``T(x)`` is customised.

    system_prompt: None leaves the conversation's system turn as it is (or absent); a string (possibly
        empty) replaces it or is prepended as one.
    exemplars: blocks to draw one from, per prompt (empty: no in-context exemplars).
    """

    system_prompt: Optional[str] = None
    exemplars: Tuple[ExemplarBlock, ...] = ()

    @property
    def vanilla(self) -> bool:
        return self.system_prompt is None and not self.exemplars


def _exemplar(obj: Any, where: str) -> Exemplar:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "good", "bad")):
        raise ValueError(f"{where}: an exemplar needs string fields prompt, good, bad (and optional explanation)")
    return Exemplar(obj["prompt"], obj["good"], obj["bad"], str(obj.get("explanation", "")))


def exemplar_blocks(items: Iterable[Any], where: str = "exemplars") -> Tuple[ExemplarBlock, ...]:
    """Blocks from dicts: ``{"criterion", "examples": [exemplar, ...]}`` or a flat exemplar
    ``{"prompt", "good", "bad", "explanation", "criterion"}`` (a block of one)."""
    blocks = []
    for i, obj in enumerate(items):
        if isinstance(obj, ExemplarBlock):
            blocks.append(obj)
        elif isinstance(obj, dict) and "examples" in obj:
            exs = obj["examples"]
            if not isinstance(exs, list) or not exs:
                raise ValueError(f"{where}[{i}]: 'examples' must be a non-empty list")
            blocks.append(ExemplarBlock(str(obj.get("criterion", "")),
                                        tuple(_exemplar(e, f"{where}[{i}].examples[{j}]") for j, e in enumerate(exs))))
        else:
            blocks.append(ExemplarBlock(str(obj.get("criterion", "")) if isinstance(obj, dict) else "",
                                        (_exemplar(obj, f"{where}[{i}]"),)))
    return tuple(blocks)


def load_exemplars(path: Union[str, Path]) -> Tuple[ExemplarBlock, ...]:
    """Exemplar blocks from a JSON list or a JSONL file (see :func:`exemplar_blocks`)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        items = json.loads(text)
        items = items if isinstance(items, list) else [items]
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return exemplar_blocks(items, str(path))


def default_domain_guidance() -> Dict[str, Guidance]:
    """Built-in per-domain guidance (see :mod:`fastpref.annotate.prompts`)."""
    return {d: Guidance(sp, exemplar_blocks(blocks, f"default {d}"))
            for d, (sp, blocks) in P.DEFAULT_DOMAIN_GUIDANCE.items()}


def load_domain_guidance(path: Union[str, Path]) -> Dict[str, Guidance]:
    """Per-domain guidance from JSON: ``{"SAFETY": {"system_prompt": ..., "exemplars": [...]}, ...}``;
    domains not in the file keep the built-in guidance."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(obj, dict) or not set(obj) <= set(DOMAINS):
        raise ValueError(f"{path}: expected an object with keys among {', '.join(DOMAINS)}")
    out = default_domain_guidance()
    for d, spec in obj.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: {d}: expected an object with system_prompt / exemplars")
        out[d] = Guidance(spec.get("system_prompt"), exemplar_blocks(spec.get("exemplars", []), f"{path}:{d}"))
    return out


def customise(prompt: PromptLike, guidance: Guidance, block: Optional[ExemplarBlock] = None) -> PromptLike:
    """``T(x)``: apply a system prompt and an exemplar block to a prompt (a string stays a string when
    the guidance is vanilla, so base models still see the raw text)."""
    if guidance.vanilla and block is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else copy.deepcopy(list(prompt))
    if block is not None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = f"{block.render()}\n\nUser: {messages[last]['content']}\nGood Assistant:"
    if guidance.system_prompt is not None:
        if messages[0]["role"] == "system":
            messages[0]["content"] = guidance.system_prompt
        else:
            messages.insert(0, {"role": "system", "content": guidance.system_prompt})
    return messages


# ---------------------------------------------------------------------------------------------
# routing


class DomainRouter:
    """Classifies requests into SAFETY / REASONING / CHAT with a labeler model (docs/methods.md#cdr-routing).

    The labeler sees ``instruction`` (system turn) and the request (user turn), then ``cue``; the
    candidate names are scored as continuations (multi-token names: sum of conditionals) and
    normalised over the candidates. ``min_prob``: below this top probability the answer is CHAT."""

    def __init__(self, labeler: ScoringModel, *, instruction: str = P.ROUTER_INSTRUCTION, cue: str = P.ROUTER_CUE,
                 min_prob: float = 0.0):
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob: expected a probability, got {min_prob}")
        self.labeler = labeler
        self.instruction = instruction
        self.cue = cue
        self.min_prob = min_prob

    def _prefix(self, query: str) -> Tuple[List[int], List[List[int]]]:
        text = self.labeler.render([{"role": "system", "content": self.instruction},
                                    {"role": "user", "content": query}]) + self.cue
        text, cands = move_trailing_space(text, [" " + d for d in DOMAINS])
        ids, cand_ids = self.labeler.prompt_ids(text), [self.labeler.encode(c) for c in cands]
        self.labeler.check_prefix(ids, max(len(c) for c in cand_ids))
        return ids, cand_ids

    def probabilities(self, queries: Sequence[str]) -> torch.Tensor:
        """[n, 3] probabilities over :data:`DOMAINS` (softmax of full-vocabulary log-probs); raises
        :class:`RecordError` for a query the labeler cannot read."""
        prepared = [self._prefix(q) for q in queries]
        cand_ids = prepared[0][1]
        if any(c != cand_ids for _, c in prepared):
            raise RuntimeError("router candidates tokenise differently across prompts")
        lp = self.labeler.candidate_logprobs([ids for ids, _ in prepared], cand_ids)
        return torch.softmax(lp, dim=-1)

    def route(self, queries: Sequence[str]) -> List[str]:
        """One domain per query; CHAT below ``min_prob`` or when the labeler cannot read the query
        (e.g. too long for it)."""
        readable = []
        for i, q in enumerate(queries):
            try:
                self._prefix(q)
                readable.append(i)
            except RecordError:
                pass
        out = [P.FALLBACK_DOMAIN] * len(queries)
        if readable:
            probs = self.probabilities([queries[i] for i in readable])
            top, idx = probs.max(dim=-1)
            for i, p, j in zip(readable, top.tolist(), idx.tolist()):
                if p >= self.min_prob:
                    out[i] = DOMAINS[j]
        return out


# ---------------------------------------------------------------------------------------------
# pairs


def build_pair(texts: Sequence[str], scores: Sequence[float], *, mode: str = "random",
               rng: Optional[random.Random] = None) -> Union[Tuple[int, int], str]:
    """``(chosen index, rejected index)`` from N scored candidates, or the reason for skipping.

    chosen = first argmax; rejected is drawn from the candidates strictly worse than the chosen one
    with a different text: uniformly (``mode="random"``, ``rng`` required) or the worst of them
    (``"worst"``, the first on ties)."""
    if mode not in PAIR_MODES:
        raise ValueError(f"mode: expected one of {', '.join(PAIR_MODES)}, got {mode!r}")
    if len(texts) != len(scores):
        raise ValueError("texts and scores differ in length")
    if len(texts) < 2:
        return "fewer than 2 candidates"
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    if all(s == scores[best] for s in scores):
        return "all candidates have the same score"
    pool = [j for j in range(len(texts)) if scores[j] < scores[best] and texts[j] != texts[best]]
    if not pool:
        return "every lower-scored candidate repeats the best text"
    if mode == "worst":
        return best, min(pool, key=lambda j: (scores[j], j))
    if rng is None:
        raise ValueError("mode='random' needs an rng")
    return best, rng.choice(pool)


# ---------------------------------------------------------------------------------------------
# annotator


@dataclass(frozen=True)
class CDRConfig:
    """Settings of :class:`CDRAnnotator` (see the module docstring for the formulas).

    guidance: customisation of every prompt when ``route`` is False.
    route: per-domain guidance (``domain_guidance``, default built-in) chosen by a router or by a
        record's ``domain`` field.
    weak_vanilla: the weak model sees the uncustomised prompt (a contrastive-prompt reward).
    weak_system_prompt: replaces the system prompt on the weak side only (e.g. one model under two prompts).
    shared_template: both models read the strong model's rendering of ``T(x)`` (the official code sends
        one string to both); default: each model renders with its own chat template.
    emit: ``"pairs"`` (prompt/chosen/rejected for ``fastpref train``) or ``"scores"`` (the record plus
        one reward per candidate).
    share_prompt: score a prompt's candidates in one shared-prompt segment (False: one padded row each).
    max_tokens_per_row: row length of the packed scoring passes.
    precision: ``fp32``, ``bf16-mixed`` (autocast), ``bf16`` (bf16 models) or ``auto`` (bf16-mixed where
        the device has fast bf16).
    """

    normalize: str = "none"
    eos: str = "include"
    guidance: Guidance = Guidance()
    route: bool = False
    domain_guidance: Optional[Mapping[str, Guidance]] = None
    weak_vanilla: bool = False
    weak_system_prompt: Optional[str] = None
    shared_template: bool = False
    pairs: str = "random"
    emit: str = "pairs"
    seed: int = 0
    share_prompt: bool = True
    max_tokens_per_row: int = DEFAULT_MAX_TOKENS_PER_ROW
    precision: str = "fp32"

    def __post_init__(self):
        for name, value, allowed in (("normalize", self.normalize, NORMALIZE), ("eos", self.eos, EOS_MODES),
                                     ("pairs", self.pairs, PAIR_MODES), ("emit", self.emit, ("pairs", "scores"))):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.precision != "auto":
            resolve_precision(self.precision, "cpu")  # the name only; "auto" is resolved per device
        mt = self.max_tokens_per_row
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise ValueError(f"max_tokens_per_row: expected a positive int, got {mt!r}")
        if self.route and self.domain_guidance is None:
            object.__setattr__(self, "domain_guidance", default_domain_guidance())
        if self.domain_guidance is not None and set(self.domain_guidance) != set(DOMAINS):
            raise ValueError(f"domain_guidance: expected guidance for each of {', '.join(DOMAINS)}")


@dataclass
class CDRItem:
    line: int
    record: Dict[str, Any]
    prompt: PromptLike
    texts: List[str]
    originals: List[Any]
    paired: bool
    domain: Optional[str] = None  # given by the record
    outputs: Dict[str, Any] = field(default_factory=dict)


def cdr_rewards(strong_logps: torch.Tensor, weak_logps: torch.Tensor, strong_counts: torch.Tensor,
                normalize: str = "none") -> torch.Tensor:
    """``log pi_strong - log pi_weak`` per response ([n] sums), divided by the strong token counts
    for ``normalize="mean"``; fp64 so the difference of two large sums keeps its digits."""
    diff = strong_logps.double() - weak_logps.double()
    if normalize == "mean":
        diff = diff / strong_counts.clamp_min(1).double()
    return diff


class CDRAnnotator(Annotator):
    """CDR rewards, pairs and agreement for JSONL records (driven by :func:`~fastpref.annotate.runner.annotate_file`).

    Input records: ``{"prompt", "responses": [y_1, ..., y_N]}`` (also ``completions``/``candidates``) ->
    a pair (``emit="pairs"``) or per-candidate ``scores``; or ``{"prompt", "chosen", "rejected"}`` ->
    ``chosen_score``, ``rejected_score`` and ``correct`` (reward accuracy against the human pair). An
    optional ``domain`` field overrides the router. Other fields are passed through."""

    name = "cdr"

    def __init__(self, strong: ScoringModel, weak: ScoringModel, config: CDRConfig = CDRConfig(), *,
                 router: Optional[DomainRouter] = None):
        self.strong, self.weak, self.cfg, self.router = strong, weak, config, router
        self._steps: Dict[int, PreferenceStep] = {}

    def config(self) -> Dict[str, Any]:
        cfg = asdict(self.cfg)
        return {"strong": self.strong.name, "weak": self.weak.name, "router": self.router.labeler.name
                if self.router else None, "router_min_prob": self.router.min_prob if self.router else None, **cfg}

    # -- parsing -----------------------------------------------------------------------------

    def parse(self, record: Dict[str, Any], line: int) -> CDRItem:
        prompt = get_prompt(record)
        texts = response_list(record, RESPONSE_KEYS)
        if texts is not None:
            key = next(k for k in RESPONSE_KEYS if k in record)
            originals, paired = list(record[key]), False
            if len(texts) < 2 and self.cfg.emit == "pairs":
                raise RecordError(f"{key!r}: need at least 2 candidates to build a pair, got {len(texts)}")
            if not texts:
                raise RecordError(f"{key!r}: no candidate")
        elif "chosen" in record or "rejected" in record:
            for key in ("chosen", "rejected"):
                if key not in record:
                    raise RecordError(f"missing key {key!r} (paired record: prompt, chosen, rejected)")
            texts = [response_text("chosen", record["chosen"]), response_text("rejected", record["rejected"])]
            originals, paired = [record["chosen"], record["rejected"]], True
        else:
            raise RecordError(f"expected 'responses' (list of candidates) or 'chosen' and 'rejected', "
                              f"got keys {sorted(record)}")
        domain = record.get("domain")
        if domain is not None:  # out-of-set labels fall back to CHAT (docs/methods.md#cdr-routing)
            domain = domain.strip().upper() if isinstance(domain, str) else None
            domain = domain if domain in DOMAINS else P.FALLBACK_DOMAIN
        return CDRItem(line, record, prompt, texts, originals, paired, domain)

    # -- scoring -----------------------------------------------------------------------------

    def _domains(self, items: List[CDRItem]) -> List[str]:
        domains = [it.domain for it in items]
        todo = [i for i, d in enumerate(domains) if d is None]
        if todo and self.cfg.route and self.router is not None:
            for i, d in zip(todo, self.router.route([query_text(items[i].prompt) for i in todo])):
                domains[i] = d
        return [d or P.FALLBACK_DOMAIN for d in domains]

    def prompts_for(self, item: CDRItem, domain: str) -> Tuple[PromptLike, PromptLike]:
        """``(T(x) for the strong model, T(x) for the weak model)`` as prompts (string or messages)."""
        guidance = self.cfg.domain_guidance[domain] if self.cfg.route else self.cfg.guidance
        block = None
        if guidance.exemplars:
            block = random.Random(f"{self.cfg.seed}:{item.line}:exemplar").choice(guidance.exemplars)
        strong = customise(item.prompt, guidance, block)
        if self.cfg.weak_vanilla:
            weak = item.prompt
        elif self.cfg.weak_system_prompt is not None:
            weak = customise(item.prompt, replace(guidance, system_prompt=self.cfg.weak_system_prompt), block)
        else:
            weak = strong
        return strong, weak

    def _response_ids(self, model: ScoringModel, text: str) -> List[int]:
        ids = model.encode(text)
        if self.cfg.eos == "include":
            if model.eos_id is None:
                raise RecordError(f"{model.name}: eos='include' but the tokenizer has no EOS token")
            ids.append(model.eos_id)
        return ids

    def _step(self, model: ScoringModel) -> PreferenceStep:
        step = self._steps.get(id(model))
        if step is None:
            step = PreferenceStep(model.fused, share_prompt=self.cfg.share_prompt,
                                  max_tokens_per_row=self.cfg.max_tokens_per_row, precision=self.cfg.precision,
                                  pad_token_id=model.pad_id)
            self._steps[id(model)] = step
        return step

    @torch.inference_mode()
    def score(self, model: ScoringModel, items: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> SequenceScores:
        """``log pi(response | prompt)`` sums and counts (CPU) of ``(prompt ids, response ids)`` items, in
        order: consecutive items with the same prompt form one shared-prompt group; groups are packed into
        rows of ``max_tokens_per_row`` tokens, ``model.batch_size`` rows per forward (about)."""
        groups: List[Tuple[List[int], List[List[int]]]] = []
        for prompt, response in items:
            if groups and groups[-1][0] == list(prompt):
                groups[-1][1].append(list(response))
            else:
                groups.append((list(prompt), [list(response)]))
        step = self._step(model)
        budget = self.cfg.max_tokens_per_row * model.batch_size
        logps, counts, chunk, used = [], [], [], 0
        for i, (prompt, answers) in enumerate(groups):
            chunk.append(Group(prompt, answers))
            used += len(prompt) + sum(len(a) for a in answers)
            if used >= budget or i == len(groups) - 1:
                out = step.logps(step.pack_groups(chunk, order="group_major"))
                logps.append(out.logps.float().cpu())
                counts.append(out.counts.cpu())
                chunk, used = [], 0
        if not logps:
            return SequenceScores(torch.zeros(0), torch.zeros(0, dtype=torch.long))
        return SequenceScores(torch.cat(logps), torch.cat(counts))

    def process(self, items: List[CDRItem]) -> List[Outcome]:
        domains = self._domains(items)
        strong_items, weak_items, owner, failed = [], [], [], {}
        for k, (item, domain) in enumerate(zip(items, domains)):
            try:
                sp, wp = self.prompts_for(item, domain)
                s_text = self.strong.render(sp)
                w_text = self.strong.render(wp) if self.cfg.shared_template else self.weak.render(wp)
                s_prompt, w_prompt = self.strong.prompt_ids(s_text), self.weak.prompt_ids(w_text)
                pairs = []
                for text in item.texts:
                    s_resp, w_resp = self._response_ids(self.strong, text), self._response_ids(self.weak, text)
                    pairs.append(((self.strong.fit(s_prompt, s_resp), s_resp), (self.weak.fit(w_prompt, w_resp), w_resp)))
            except RecordError as exc:
                failed[k] = str(exc)
                continue
            for s_pair, w_pair in pairs:
                strong_items.append(s_pair)
                weak_items.append(w_pair)
                owner.append(k)
        rewards = strong = weak = None
        if strong_items:
            strong = self.score(self.strong, strong_items)
            weak = self.score(self.weak, weak_items)
            rewards = cdr_rewards(strong.logps, weak.logps, strong.counts, self.cfg.normalize).tolist()
        per_item: Dict[int, List[float]] = {}
        for pos, k in enumerate(owner):
            per_item.setdefault(k, []).append(rewards[pos])
        outcomes = []
        for k, (item, domain) in enumerate(zip(items, domains)):
            if k in failed:
                outcomes.append(Outcome(error=failed[k]))
                continue
            scores = per_item[k]
            if not all(math.isfinite(s) for s in scores):
                outcomes.append(Outcome(error=f"non-finite CDR reward {scores}"))
                continue
            outcomes.append(self._outcome(item, domain, scores))
        return outcomes

    def _outcome(self, item: CDRItem, domain: str, scores: List[float]) -> Outcome:
        rec = item.record
        if item.paired:
            out = dict(rec)
            out.pop("source_line", None)
            out.update(chosen_score=scores[0], rejected_score=scores[1], correct=scores[0] > scores[1], domain=domain)
            return Outcome(out)
        if self.cfg.emit == "scores":
            out = dict(rec)
            out.pop("source_line", None)
            out.update(scores=scores, domain=domain)
            return Outcome(out)
        rng = random.Random(f"{self.cfg.seed}:{item.line}:pair")
        pair = build_pair(item.texts, scores, mode=self.cfg.pairs, rng=rng)
        if isinstance(pair, str):
            return Outcome(skipped=pair)
        c, r = pair
        out = extras(rec, ("prompt", "domain") + RESPONSE_KEYS)
        out.update(prompt=item.prompt, chosen=as_response(item.prompt, item.texts[c], item.originals[c]),
                   rejected=as_response(item.prompt, item.texts[r], item.originals[r]),
                   chosen_score=scores[c], rejected_score=scores[r], chosen_index=c, rejected_index=r,
                   scores=scores, domain=domain)
        return Outcome(out)

    # -- summary -----------------------------------------------------------------------------

    def metrics(self, records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
        n, correct, judged, margins, domains = 0, 0, 0, [], {}
        for rec in records:
            n += 1
            domains[rec.get("domain")] = domains.get(rec.get("domain"), 0) + 1
            if "correct" in rec:
                judged += 1
                correct += bool(rec["correct"])
            if "chosen_score" in rec and "rejected_score" in rec:
                margins.append(rec["chosen_score"] - rec["rejected_score"])
        out: Dict[str, Any] = {"records": n, "domains": domains}
        if judged:
            out["accuracy_vs_human"] = correct / judged
            out["judged_pairs"] = judged
        if margins:
            out["mean_margin"] = sum(margins) / len(margins)
        return out
