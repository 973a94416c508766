"""RLAIF labelers (Lee et al., arXiv 2309.00267; docs/methods.md#rlaif): soft pairwise AI preferences and
direct (d-RLAIF) scores from an LLM's next-token log-probs.

Pairwise (paper §2.1). The labeler reads a preamble, optional few-shot exemplars, the sample
(``Text - x``, ``Summary 1 - a``, ``Summary 2 - b``; dialogue: ``Context``/``Response``) and the ending
``Preferred Summary=`` (``Preferred Response=``). With ``l_k`` the full-vocabulary log-prob of the
next token being ``"k"``::

    P(1) = exp(l_1) / (exp(l_1) + exp(l_2)) = sigmoid(l_1 - l_2)

Position debiasing (paper §2.1.1): score both orders and average after mapping back::

    P(a > b) = 1/2 [ P_ab("1") + P_ba("2") ]

Chain-of-thought (paper §2.1.2): the ending is replaced by a rationale request ending in ``Rationale:``,
the labeler decodes greedily (at most ``max_new_tokens``), then prompt + rationale + the standard
ending are scored as above (once per order when debiasing).

Self-consistency (Lee et al., 2023, RLAIF, arXiv 2309.00267, App. M; the idea is Wang et al., 2022,
arXiv 2203.11171; docs/methods.md#rlaif-self-consistency): with ``samples = K``, each order samples
``K`` rationales at ``temperature`` instead of one greedy rationale, scores each (prompt + rationale
``i`` + ending, as above) and averages the preference distributions (not the log-probs, not a vote)::

    P_ab("1") = 1/K sum_i P_ab("1" | rationale_i),   then position debiasing as above.

Sampling is our own loop (:func:`sample_continuations`): per rationale a ``torch.Generator`` seeded from
``(seed, input line, order, i)``, one uniform draw per token, the token found by inverting the CDF of
``softmax(logits / temperature)`` (float64, full vocabulary, or the ``top_k`` largest logits: the paper
used top-K 40); a rationale ends at EOS or after ``max_new_tokens``. Seeds depend on the input line, not on the batch, so a resumed run samples the same
rationales.

Direct RLAIF (paper §2.2.2). The labeler rates one response from 1 to 10 after ``SCORE:``; with ``P(i)`` the
candidates' probabilities renormalised over 1..10 (whole strings: "10" may be two tokens, scored as the
sum of its conditionals)::

    s = sum_i i * P(i),        reward = (s - 5.5) / 4.5  in [-1, 1]

The paper does not state its rescaling; ``(s - 5.5) / 4.5`` (the affine map of [1, 10] onto [-1, 1])
is our assumption (docs/methods.md#d-rlaif).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from fastpref.annotate import prompts as P
from fastpref.annotate.jsonl import RecordError
from fastpref.annotate.records import PromptLike, as_response, extras, get_prompt, response_list, response_text, transcript
from fastpref.annotate.runner import Annotator, Outcome
from fastpref.annotate.scoring import ScoringModel, left_padded, move_trailing_space

PROMPT_KEYS = ("prompt", "context", "text")
MODES = ("pairwise", "direct")
SCORE_LOW, SCORE_HIGH = 1, 10


# ---------------------------------------------------------------------------------------------
# formulas


def soft_preference(logp_1, logp_2):
    """``P(1) = e^{l1} / (e^{l1} + e^{l2}) = sigmoid(l1 - l2)`` (docs/methods.md#rlaif); floats or tensors."""
    if isinstance(logp_1, torch.Tensor) or isinstance(logp_2, torch.Tensor):
        return torch.sigmoid(torch.as_tensor(logp_1) - torch.as_tensor(logp_2))
    d = float(logp_1) - float(logp_2)
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def debiased_preference(p_ab_1, p_ba_2):
    """``P(a > b) = 1/2 [P_ab("1") + P_ba("2")]``: the two orders' probabilities that ``a`` wins
    (docs/methods.md#rlaif-debiasing). Worked example (docs/methods.md#worked-numbers): sigmoid(1.0) and sigmoid(0.4) give 0.664873."""
    return 0.5 * (p_ab_1 + p_ba_2)


def expected_score(logps: torch.Tensor, values: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``s = sum_i v_i P(i)`` with ``P = softmax(logps)`` over the last dim; ``values`` default 1..K."""
    logps = torch.as_tensor(logps, dtype=torch.float64)
    if values is None:
        values = torch.arange(1, logps.shape[-1] + 1, dtype=torch.float64)
    return (torch.softmax(logps, dim=-1) * torch.as_tensor(values, dtype=torch.float64)).sum(-1)


def rescale_score(s, low: float = SCORE_LOW, high: float = SCORE_HIGH):
    """Affine map of ``[low, high]`` onto ``[-1, 1]``: ``(s - (low+high)/2) / ((high-low)/2)``; for 1..10
    that is ``(s - 5.5) / 4.5`` (an assumption: the paper does not state its map). docs/methods.md#worked-numbers: 8.0 -> 0.5556."""
    return (s - 0.5 * (low + high)) / (0.5 * (high - low))


# ---------------------------------------------------------------------------------------------
# self-consistency sampling


def sample_seed(seed: int, line: int, order: int, index: int) -> int:
    """Seed of the ``index``-th sampled rationale for input ``line`` in ``order`` (0: a-b, 1: b-a):
    a hash, so neighbouring lines and samples get unrelated streams."""
    digest = hashlib.sha256(f"fastpref/rlaif/self-consistency/{seed}/{line}/{order}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator,
                 top_k: Optional[int] = None) -> int:
    """One token from ``softmax(logits / temperature)`` (``logits [V]``, computed in float64 on the CPU;
    ``top_k``: only the ``k`` largest logits, ties at the k-th included) by inverting its CDF at one
    uniform draw of ``generator``; a zero-probability token is never drawn."""
    z = logits.detach().to("cpu", torch.float64)
    if top_k is not None and top_k < z.numel():
        z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
    probs = torch.softmax(z / temperature, dim=-1)
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(cdf.numel() - 1))


@torch.inference_mode()
def sample_continuations(labeler: ScoringModel, prefixes: Sequence[Sequence[int]], seeds: Sequence[int],
                         max_new_tokens: int, temperature: float, top_k: Optional[int] = None) -> List[str]:
    """Sampled continuations of token-id prefixes, one ``torch.Generator(seed)`` per prefix (see
    :func:`sample_token`), decoded without special tokens; each stops at EOS or ``max_new_tokens``.

    Batches of ``labeler.batch_size`` prefixes run through the model's backbone with a KV cache (left
    padding, explicit positions); the next-token logits are ``h_last @ W.T (+ b)`` in fp32, divided by the
    model's head temperature and by ``temperature``."""
    weight, bias = labeler.fused.head()
    scale = float(labeler.fused.temperature) * float(temperature)
    texts: List[Optional[str]] = [None] * len(prefixes)
    for batch in labeler._order([len(p) for p in prefixes]):
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in batch]
        new = _sample_batch(labeler, [list(prefixes[i]) for i in batch], gens, max_new_tokens, weight, bias, scale,
                            top_k)
        for k, i in enumerate(batch):
            texts[i] = labeler.tokenizer.decode(new[k], skip_special_tokens=True)
    return texts


def _sample_batch(labeler: ScoringModel, seqs, gens, max_new_tokens: int, weight, bias, scale: float,
                  top_k: Optional[int]) -> List[List[int]]:
    backbone, dev = labeler.fused.backbone, labeler.device
    ids, mask, pos = left_padded(seqs, labeler.pad_id, dev)
    b = ids.shape[0]
    res = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = getattr(res, "past_key_values", None)
    new: List[List[int]] = [[] for _ in range(b)]
    alive = [True] * b
    for step in range(max_new_tokens):
        h = res.last_hidden_state[:, -1].float()
        logits = h @ weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        nxt = []
        for k in range(b):
            tok = labeler.pad_id
            if alive[k]:
                tok = sample_token(logits[k], scale, gens[k], top_k)
                if tok == labeler.eos_id:
                    alive[k] = False
                else:
                    new[k].append(tok)
            nxt.append(tok)
        if not any(alive) or step == max_new_tokens - 1:
            break
        tok = torch.tensor(nxt, dtype=torch.long, device=dev)[:, None]
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        if cache is not None:
            res = backbone(input_ids=tok, attention_mask=mask, position_ids=pos[:, -1:], past_key_values=cache,
                           use_cache=True)
            cache = res.past_key_values
        else:  # no cache support: recompute the whole sequence
            ids = torch.cat([ids, tok], dim=1)
            res = backbone(input_ids=ids, attention_mask=mask, position_ids=pos)
    return new


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class PairExemplar:
    """A few-shot example: context, two responses, the preferred one (1 or 2), optional rationale."""

    context: str
    response_1: str
    response_2: str
    preferred: int
    rationale: Optional[str] = None

    def __post_init__(self):
        if self.preferred not in (1, 2):
            raise ValueError(f"preferred: expected 1 or 2, got {self.preferred!r}")


def load_pair_exemplars(path: Union[str, Path]) -> Tuple[PairExemplar, ...]:
    """Few-shot exemplars from JSONL: ``{"context" | "prompt" | "text", "response_1", "response_2"
    (or "responses": [a, b]), "preferred" | "label": 1 | 2, "rationale"?}``."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        try:
            ctx = transcript(get_prompt(obj, PROMPT_KEYS))
            pair = response_list(obj, ("responses",)) or [response_text("response_1", obj.get("response_1")),
                                                          response_text("response_2", obj.get("response_2"))]
            if len(pair) != 2:
                raise RecordError("expected exactly 2 responses")
            out.append(PairExemplar(ctx, pair[0], pair[1], int(obj.get("preferred", obj.get("label"))),
                                    obj.get("rationale")))
        except (RecordError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{i}: {exc}") from None
    return tuple(out)


def resolve_preamble(task: str, preamble: str) -> str:
    """``"base"`` / ``"detailed"`` -> the built-in preamble of ``task``; anything else is the text itself."""
    return P.PREAMBLES.get((task, preamble), preamble)


@dataclass(frozen=True)
class RLAIFConfig:
    """Settings of :class:`RLAIFLabeler`.

    task: ``"summarization"`` or ``"dialogue"`` (labels and ending, see :data:`prompts.TASKS`).
    preamble: ``"base"``, ``"detailed"`` or a literal preamble.
    mode: ``"pairwise"`` (soft preference of two responses) or ``"direct"`` (d-RLAIF 1-10 score of each).
    debias: score both orders and average (pairwise).
    cot: greedy chain-of-thought rationale before scoring (pairwise), at most ``max_new_tokens``.
    samples: self-consistency: ``K > 0`` sampled rationales per order (at ``temperature``, seeded by
        ``seed`` and the input line) whose preference distributions are averaged; 0: one greedy rationale.
    temperature, top_k: sampling of those rationales (``top_k`` None: the full vocabulary).
    emit: pairwise only: ``"labels"`` (the record plus soft labels) or ``"pairs"`` (prompt/chosen/rejected
        ordered by the AI preference; exact ties skipped).
    direct_preamble: d-RLAIF instruction (default: built-in for ``task``).
    """

    task: str = "summarization"
    preamble: str = "base"
    exemplars: Tuple[PairExemplar, ...] = ()
    mode: str = "pairwise"
    debias: bool = True
    cot: bool = False
    max_new_tokens: int = 512
    cot_request: Optional[str] = None
    emit: str = "labels"
    direct_preamble: Optional[str] = None
    samples: int = 0
    temperature: float = 1.0
    top_k: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.task not in P.TASKS:
            raise ValueError(f"task: expected one of {', '.join(P.TASKS)}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.emit not in ("labels", "pairs"):
            raise ValueError(f"emit: expected labels or pairs, got {self.emit!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"samples: expected an integer >= 0 (0: greedy rationale), got {self.samples!r}")
        if self.samples and not self.cot:
            raise ValueError("samples: self-consistency samples chain-of-thought rationales; set cot=True (--cot)")
        if self.samples and self.mode != "pairwise":
            raise ValueError("samples: self-consistency is for pairwise labelling")
        if isinstance(self.temperature, bool) or not (isinstance(self.temperature, (int, float))
                                                      and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected an integer >= 1 or None (no truncation), got {self.top_k!r}")


@dataclass
class RLAIFItem:
    line: int
    record: Dict[str, Any]
    prompt: PromptLike
    texts: List[str]
    originals: List[Any]
    human: Optional[int] = None  # pairwise: 1 or 2
    layout: str = "pair"  # pair | chosen_rejected | single | list


class RLAIFLabeler(Annotator):
    """Pairwise soft AI preferences or d-RLAIF scores for JSONL records.

    Pairwise input: ``{"prompt" | "context" | "text", "responses": [a, b]}`` or ``response_1``/``response_2``
    (optional human ``label``: 1 or 2), or ``{"prompt", "chosen", "rejected"}`` (human label 1 = chosen).
    Output (``emit="labels"``): the record plus ``ai_preference`` = P(response 1 > response 2),
    ``p_order_ab`` = P_ab("1"), ``p_order_ba`` = P_ba("2") (debiasing on), ``ai_label`` (1, 2 or 0 for a
    tie), ``rationales`` (CoT: one per order; self-consistency: a list of ``samples`` per order, with the
    per-sample ``p_order_ab_samples`` / ``p_order_ba_samples`` that ``p_order_ab`` / ``p_order_ba`` average)
    and ``agrees`` when a human label exists.

    Direct input: ``response``/``completion``, ``responses`` [...], ``response_1``/``response_2`` or
    ``chosen``/``rejected``; output: ``score``/``reward`` (or ``scores``/``rewards``, or
    ``chosen_*``/``rejected_*``), plus ``agrees`` for chosen/rejected or two responses with a ``label``."""

    name = "rlaif"

    def __init__(self, labeler: ScoringModel, config: RLAIFConfig = RLAIFConfig()):
        self.labeler, self.cfg = labeler, config
        self.fmt = P.TASKS[config.task]
        self.preamble = resolve_preamble(config.task, config.preamble)
        self.cot_request = config.cot_request or P.COT_REQUESTS[config.task]
        self.direct_preamble = config.direct_preamble or P.DIRECT_PREAMBLES[config.task]

    def config(self) -> Dict[str, Any]:
        return {"labeler": self.labeler.name, "chat": self.labeler.use_chat, **asdict(self.cfg)}

    # -- parsing -----------------------------------------------------------------------------

    def parse(self, record: Dict[str, Any], line: int) -> RLAIFItem:
        prompt = get_prompt(record, PROMPT_KEYS)
        if "chosen" in record or "rejected" in record:
            for key in ("chosen", "rejected"):
                if key not in record:
                    raise RecordError(f"missing key {key!r} (paired record: prompt, chosen, rejected)")
            texts = [response_text("chosen", record["chosen"]), response_text("rejected", record["rejected"])]
            return RLAIFItem(line, record, prompt, texts, [record["chosen"], record["rejected"]], 1, "chosen_rejected")
        texts = response_list(record, ("responses",))
        originals = list(record["responses"]) if texts is not None else None
        layout = "list"
        if texts is None and "response_1" in record:
            texts = [response_text("response_1", record["response_1"]),
                     response_text("response_2", record.get("response_2"))]
            originals, layout = [record["response_1"], record["response_2"]], "pair"
        if texts is None and self.cfg.mode == "direct":
            key = next((k for k in ("response", "completion") if k in record), None)
            if key is not None:
                texts, originals, layout = [response_text(key, record[key])], [record[key]], "single"
        if texts is None:
            raise RecordError(f"expected 'responses', 'response_1'/'response_2' or 'chosen'/'rejected'"
                              f"{' or response' if self.cfg.mode == 'direct' else ''}, got keys {sorted(record)}")
        if self.cfg.mode == "pairwise" and len(texts) != 2:
            raise RecordError(f"pairwise labelling needs exactly 2 responses, got {len(texts)}")
        if not texts:
            raise RecordError("no response to score")
        human = record.get("label")
        if human is not None and len(texts) == 2:
            if isinstance(human, bool) or human not in (1, 2):
                raise RecordError(f"'label': expected 1 or 2 (the response humans preferred), got {human!r}")
            human = int(human)
        else:
            human = None
        return RLAIFItem(line, record, prompt, texts, originals, human, layout)

    # -- prompts -----------------------------------------------------------------------------

    def _sample(self, context: str, a: str, b: str) -> str:
        f = self.fmt
        return f"{f.context_label} - {context}\n{f.response_label} 1 - {a}\n{f.response_label} 2 - {b}"

    def body(self, context: str, a: str, b: str, *, cot: bool = False) -> str:
        """Preamble, exemplars and the sample (everything before the ending or the rationale request)."""
        parts = [self.preamble]
        for ex in self.cfg.exemplars:
            text = self._sample(ex.context, ex.response_1, ex.response_2)
            if cot and ex.rationale:
                text += f"\n{P.COT_CUE} {ex.rationale}"
            parts.append(f"{text}\n{self.fmt.ending}{ex.preferred}")
        parts.append(self._sample(context, a, b))
        return "\n\n".join(parts)

    def _prefix(self, user_text: str, assistant_start: str) -> str:
        """Plain: user text, newline, then the assistant-side text; chat: a user turn, then the
        assistant turn starting with ``assistant_start``."""
        if self.labeler.use_chat:
            return self.labeler.render(user_text) + assistant_start
        return user_text + "\n" + assistant_start

    def score_prompt(self, context: str, a: str, b: str, rationale: Optional[str] = None) -> str:
        """Text after which "1"/"2" is scored (with a rationale: the CoT second step)."""
        if rationale is None:
            return self._prefix(self.body(context, a, b), self.fmt.ending)
        return self.cot_prompt(context, a, b) + " " + rationale.strip() + "\n" + self.fmt.ending

    def cot_prompt(self, context: str, a: str, b: str) -> str:
        """Text the rationale is generated from (CoT first step)."""
        return self._prefix(self.body(context, a, b, cot=True) + "\n\n" + self.cot_request, P.COT_CUE)

    def direct_prompt(self, context: str, response: str) -> str:
        f = self.fmt
        user = f"{self.direct_preamble}\n\n{f.direct_context}: {context}\n\n{f.direct_response}: {response}"
        return self._prefix(user, f.direct_ending)

    # -- scoring -----------------------------------------------------------------------------

    def _prepare(self, text: str, choices: Sequence[str]) -> Tuple[List[int], List[List[int]]]:
        """``(prefix ids, choice ids)`` for scoring ``choices`` after ``text``; raises :class:`RecordError`
        when the prompt does not fit the labeler."""
        text, cands = move_trailing_space(text, choices)
        ids = self.labeler.prompt_ids(text)
        cand_ids = [self.labeler.encode(c) for c in cands]
        self.labeler.check_prefix(ids, max(len(c) for c in cand_ids))
        return ids, cand_ids

    def _score(self, prepared: Dict[int, Tuple[List[int], List[List[int]]]]) -> Dict[int, torch.Tensor]:
        """Full-vocabulary log-probs of the choices after every prepared prefix (by job index)."""
        if not prepared:
            return {}
        jobs = sorted(prepared)
        cand_ids = prepared[jobs[0]][1]
        if any(prepared[j][1] != cand_ids for j in jobs):
            raise RuntimeError("choice strings tokenise differently across prompts")
        lp = self.labeler.candidate_logprobs([prepared[j][0] for j in jobs], cand_ids).double()
        return dict(zip(jobs, lp))

    def process(self, items: List[RLAIFItem]) -> List[Outcome]:
        if self.cfg.mode == "direct":
            return self._process_direct(items)
        return self._process_pairwise(items)

    def _process_pairwise(self, items: List[RLAIFItem]) -> List[Outcome]:
        orders = [(0, 1), (1, 0)] if self.cfg.debias else [(0, 1)]
        jobs = [(k, o) for k in range(len(items)) for o in orders]  # (item, order)
        ctx = [transcript(it.prompt) for it in items]
        failed: Dict[int, str] = {}

        def slots(j):
            k, (x, y) = jobs[j]
            return ctx[k], items[k].texts[x], items[k].texts[y]

        n_samples = max(self.cfg.samples, 1)
        rationales: Dict[Tuple[int, int], str] = {}  # (job, sample) -> rationale
        if self.cfg.cot:
            cot_ids = {}
            for j, (k, _) in enumerate(jobs):
                try:
                    ids = self.labeler.prompt_ids(self.cot_prompt(*slots(j)))
                    self.labeler.check_prefix(ids, self.cfg.max_new_tokens)
                    cot_ids[j] = ids
                except RecordError as exc:
                    failed.setdefault(k, str(exc))
            live = [(j, i) for j in cot_ids if jobs[j][0] not in failed for i in range(n_samples)]
            prefixes = [cot_ids[j] for j, _ in live]
            if self.cfg.samples:
                seeds = [sample_seed(self.cfg.seed, items[jobs[j][0]].line, orders.index(jobs[j][1]), i)
                         for j, i in live]
                texts = sample_continuations(self.labeler, prefixes, seeds, self.cfg.max_new_tokens,
                                             self.cfg.temperature, self.cfg.top_k)
            else:
                texts = self.labeler.generate(prefixes, self.cfg.max_new_tokens)
            rationales = {key: t.strip() for key, t in zip(live, texts)}
        prepared = {}
        for j, (k, _) in enumerate(jobs):
            for i in range(n_samples if self.cfg.cot else 1):
                if k in failed:
                    continue
                try:
                    prepared[(j, i)] = self._prepare(self.score_prompt(*slots(j), rationales.get((j, i))), ["1", "2"])
                except RecordError as exc:
                    failed.setdefault(k, str(exc))
        lp = self._score({key: v for key, v in prepared.items() if jobs[key[0]][0] not in failed})
        outcomes = []
        for k, item in enumerate(items):
            if k in failed:
                outcomes.append(Outcome(error=failed[k]))
                continue
            js = [j for j, (kk, _) in enumerate(jobs) if kk == k]
            keys = [[key for key in sorted(lp) if key[0] == j] for j in js]
            # P(slot 1 wins) per order and sample; self-consistency averages the samples' distributions
            p_each = [[float(soft_preference(lp[key][0], lp[key][1])) for key in ks] for ks in keys]
            p_first = [sum(ps) / len(ps) for ps in p_each]
            p_ab = p_first[0]
            p_ba = 1.0 - p_first[1] if self.cfg.debias else None
            p = debiased_preference(p_ab, p_ba) if self.cfg.debias else p_ab
            if not math.isfinite(p):
                outcomes.append(Outcome(error=f"non-finite preference (log-probs {[lp[key].tolist() for ks in keys for key in ks]})"))
                continue
            if self.cfg.samples:
                texts = [[rationales.get(key) for key in ks] for ks in keys]
                samples = {"p_order_ab_samples": p_each[0]}
                if self.cfg.debias:
                    samples["p_order_ba_samples"] = [1.0 - q for q in p_each[1]]
            else:
                texts, samples = [rationales.get((j, 0)) for j in js], {}
            outcomes.append(self._pairwise_outcome(item, p, p_ab, p_ba, texts, samples))
        return outcomes

    def _pairwise_outcome(self, item: RLAIFItem, p: float, p_ab: float, p_ba: Optional[float],
                          rationales: List[Any], samples: Optional[Dict[str, Any]] = None) -> Outcome:
        ai_label = 1 if p > 0.5 else 2 if p < 0.5 else 0
        if self.cfg.emit == "pairs":
            if ai_label == 0:
                return Outcome(skipped="the AI preference is an exact tie")
            c, r = (0, 1) if ai_label == 1 else (1, 0)
            keys = ("prompt", "context", "text", "responses", "response_1", "response_2", "chosen", "rejected", "label")
            out = extras(item.record, keys)
            out.update(prompt=item.prompt, chosen=as_response(item.prompt, item.texts[c], item.originals[c]),
                       rejected=as_response(item.prompt, item.texts[r], item.originals[r]),
                       ai_preference=max(p, 1.0 - p))
            if item.human is not None:
                out["agrees"] = ai_label == item.human
            return Outcome(out)
        out = dict(item.record)
        out.pop("source_line", None)
        out.update(ai_preference=p, ai_label=ai_label, p_order_ab=p_ab)
        if p_ba is not None:
            out["p_order_ba"] = p_ba
        if self.cfg.cot:
            out["rationales"] = rationales
        out.update(samples or {})
        if item.human is not None:
            out["agrees"] = ai_label == item.human
        return Outcome(out)

    def _process_direct(self, items: List[RLAIFItem]) -> List[Outcome]:
        jobs = [(k, i) for k, it in enumerate(items) for i in range(len(it.texts))]
        choices = [str(v) for v in range(SCORE_LOW, SCORE_HIGH + 1)]
        failed: Dict[int, str] = {}
        prepared = {}
        for j, (k, i) in enumerate(jobs):
            if k in failed:
                continue
            try:
                prepared[j] = self._prepare(self.direct_prompt(transcript(items[k].prompt), items[k].texts[i]), choices)
            except RecordError as exc:
                failed[k] = str(exc)
        lp = self._score({j: v for j, v in prepared.items() if jobs[j][0] not in failed})
        values = list(range(SCORE_LOW, SCORE_HIGH + 1))
        outcomes = []
        for k, item in enumerate(items):
            if k in failed:
                outcomes.append(Outcome(error=failed[k]))
                continue
            s = [float(expected_score(lp[j], values)) for j, (kk, _) in enumerate(jobs) if kk == k]
            if not all(math.isfinite(v) for v in s):
                outcomes.append(Outcome(error=f"non-finite score {s}"))
                continue
            r = [rescale_score(v) for v in s]
            out = dict(item.record)
            out.pop("source_line", None)
            if item.layout == "single":
                out.update(score=s[0], reward=r[0])
            elif item.layout == "chosen_rejected":
                out.update(chosen_score=s[0], rejected_score=s[1], chosen_reward=r[0], rejected_reward=r[1],
                           agrees=s[0] > s[1])
            else:
                out.update(scores=s, rewards=r)
                if item.human is not None:
                    out["agrees"] = s[item.human - 1] > s[2 - item.human]
            outcomes.append(Outcome(out))
        return outcomes

    # -- summary -----------------------------------------------------------------------------

    def metrics(self, records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
        """Agreement with human labels (ties count 1/2 in ``agreement``), the mean AI preference and,
        with debiasing, the share of records where both orders picked the same *slot* (position bias)."""
        n, agree, judged, ties, same, both, prefs, scores = 0, 0.0, 0, 0, 0, 0, [], []
        for rec in records:
            n += 1
            if "ai_preference" in rec:
                prefs.append(rec["ai_preference"])
            if "agrees" in rec:
                judged += 1
                tie = rec.get("ai_label") == 0
                ties += tie
                agree += 0.5 if tie else float(bool(rec["agrees"]))
            if "p_order_ab" in rec and "p_order_ba" in rec:
                both += 1
                slot_ab = 1 if rec["p_order_ab"] > 0.5 else 2
                slot_ba = 2 if rec["p_order_ba"] > 0.5 else 1  # in order ba, response 1 sits in slot 2
                same += slot_ab == slot_ba
            for key in ("score", "chosen_score", "rejected_score"):
                if self.cfg.mode == "direct" and key in rec:
                    scores.append(rec[key])
            if self.cfg.mode == "direct" and "scores" in rec:
                scores.extend(rec["scores"])
        out: Dict[str, Any] = {"records": n}
        if prefs:
            out["mean_ai_preference"] = sum(prefs) / len(prefs)
        if judged:
            out["agreement_vs_human"] = agree / judged
            out["judged"] = judged
        if both:
            out["same_position_preferred"] = same / both
        if scores:
            out["mean_score"] = sum(scores) / len(scores)
        return out
