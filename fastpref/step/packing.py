"""Token layouts for a preference step: prefix-shared groups packed many to a row, without padding.

A *group* is one prompt and its N >= 1 answers (a DPO pair: chosen, rejected; point-wise data: one
completion; CDR: all candidates of a prompt). Three layouts, all described by one :class:`PackedBatch`:

* ``shared``: one segment per group, ``[prompt | a1 | a2 | ...]``. Every answer attends to the prompt
  and causally to itself, never to another answer or group; its position ids continue from the prompt
  end (answer k starts at ``len(prompt)``), so each answer sees exactly what it would see alone.
* ``unshared``: one segment per (prompt, answer) sequence, block-diagonal causal (the prompt is repeated).
* ``padded``: one row per sequence, right padding and a 2D mask (for models that cannot take a custom
  mask; transformers then builds its own masks, sliding windows included).

Segments are packed first-fit-decreasing into rows of at most ``max_tokens_per_row`` tokens (a longer
segment gets a row of its own; a smaller capacity is used when it leaves fewer padding slots), so the
``[R, 1, L, L]`` mask stays small. The op inputs select the hidden rows that predict answer tokens: the last prompt position predicts the first token of *every* answer of
its group, so it appears N times, each time with another label. Sequences are numbered in the collator's
order: answer-major (all first answers, then all second answers ...: for pairs chosen ``[0, B)`` then
rejected ``[B, 2B)``), or group-major for groups with different numbers of answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

LAYOUTS = ("shared", "unshared", "padded")
ORDERS = ("answer_major", "group_major")
DEFAULT_MAX_TOKENS_PER_ROW = 1024


@dataclass(frozen=True)
class Group:
    """One prompt (token ids, may be empty) and its answers (each a non-empty list of token ids)."""

    prompt: Sequence[int]
    answers: Sequence[Sequence[int]]


@dataclass(frozen=True)
class PackedBatch:
    """A packed preference batch, ready for the backbone and the fused op.

    input_ids: [R, L] int64 (pad id at row ends).
    position_ids: [R, L] int64 (each answer continues from its prompt's end; 0 on padding).
    attention_mask: ``shared``/``unshared``: [R, 1, L, L] bool, True where a query (dim 2) may attend a key
        (dim 3); padding attends only to itself so no row is fully masked. ``padded``: [R, L] int64, 1 on tokens.
    rows: [M] int64 flat indices into the ``R * L`` hidden rows, one per scored answer token (repeats allowed).
    labels: [M] int64 token predicted from each of those rows.
    seq_ids: [M] int64 output sequence of each row, in ``[0, num_seqs)``.
    num_seqs: number of sequences (sum of the groups' answer counts).
    num_tokens: real (non-padding) tokens in the batch; num_slots: ``R * L``.
    layout: ``"shared"``, ``"unshared"`` or ``"padded"``.
    segment_ids, block_ids: ``shared``/``unshared`` only, [R, L] int64: the mask in O(R * L) (what a
        flex-attention block mask is built from). A query may attend a key when both have the same
        segment id, the key is not later, and the key's block is 0 (prompt) or the query's block (its
        own answer). Each padding slot has a segment id of its own (negative).
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    labels: Tensor
    seq_ids: Tensor
    num_seqs: int
    num_tokens: int
    num_slots: int
    layout: str
    segment_ids: Optional[Tensor] = None
    block_ids: Optional[Tensor] = None

    def to(self, device) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                           move(self.rows), move(self.labels), move(self.seq_ids), self.num_seqs,
                           self.num_tokens, self.num_slots, self.layout, move(self.segment_ids),
                           move(self.block_ids))

    @property
    def fill(self) -> float:
        """Fraction of token slots holding real tokens."""
        return self.num_tokens / max(1, self.num_slots)


def _check_groups(groups: Sequence[Group]) -> None:
    if not groups:
        raise ValueError("groups: empty batch")
    for i, g in enumerate(groups):
        if not g.answers:
            raise ValueError(f"groups[{i}]: no answer (need N >= 1)")
        for k, a in enumerate(g.answers):
            if len(a) == 0:
                raise ValueError(f"groups[{i}].answers[{k}]: empty answer")


def sequence_numbers(groups: Sequence[Group], order: str = "answer_major") -> List[List[int]]:
    """Output sequence index of every answer: ``numbers[g][k]``.

    ``answer_major``: ``k * G + g`` (needs the same N in every group: the collator's chosen-then-rejected
    order); ``group_major``: answers numbered group after group."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")
    if order == "answer_major":
        n = {len(g.answers) for g in groups}
        if len(n) != 1:
            raise ValueError(f"order='answer_major': groups have different answer counts {sorted(n)}; "
                             "use order='group_major'")
        G = len(groups)
        return [[k * G + gi for k in range(len(g.answers))] for gi, g in enumerate(groups)]
    out, s = [], 0
    for g in groups:
        out.append(list(range(s, s + len(g.answers))))
        s += len(g.answers)
    return out


@dataclass
class _Segment:
    """One attention island: a prompt and the answers that share it (one answer when unshared)."""

    prompt: Sequence[int]
    answers: List[Tuple[Sequence[int], int]]  # (token ids, output sequence id)

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(a) for a, _ in self.answers)


def _segments(groups: Sequence[Group], numbers: List[List[int]], share: bool) -> List[_Segment]:
    if share:
        return [_Segment(g.prompt, list(zip(g.answers, nums))) for g, nums in zip(groups, numbers)]
    return [_Segment(g.prompt, [(a, s)]) for g, nums in zip(groups, numbers) for a, s in zip(g.answers, nums)]


def _first_fit_decreasing(lengths: List[int], capacity: int) -> List[List[int]]:
    bins: List[List[int]] = []
    free: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """First-fit-decreasing bins of at most ``capacity`` tokens (a longer segment alone), at the capacity
    (``capacity`` or 1/2 .. 7/8 of it) that leaves the fewest token slots ``R * L``, then the least
    attention work ``R * L**2``: a full capacity can leave every row a segment short."""
    best = None
    for c in sorted({max(1, capacity * k // 8) for k in range(4, 9)}):
        bins = _first_fit_decreasing(lengths, c)
        L = max(sum(lengths[i] for i in b) for b in bins)
        cost = (len(bins) * L, len(bins) * L * L)
        if best is None or cost < best[0]:
            best = (cost, bins)
    return best[1]


def pack_groups(groups: Sequence[Group], *, share_prompt: bool = True,
                max_tokens_per_row: Optional[int] = DEFAULT_MAX_TOKENS_PER_ROW, order: str = "answer_major",
                pad_token_id: int = 0) -> PackedBatch:
    """Pack ``groups`` into rows (layout ``shared`` or ``unshared``); see the module docstring.

    ``max_tokens_per_row``: row capacity (None: everything in one row); a segment longer than it gets
    its own row. Returns a :class:`PackedBatch` on the CPU."""
    _check_groups(groups)
    if max_tokens_per_row is not None and (isinstance(max_tokens_per_row, bool) or int(max_tokens_per_row) < 1):
        raise ValueError(f"max_tokens_per_row: expected a positive int or None, got {max_tokens_per_row!r}")
    numbers = sequence_numbers(groups, order)
    segs = _segments(groups, numbers, share_prompt)
    lengths = [len(s) for s in segs]
    bins = ([list(range(len(lengths)))] if max_tokens_per_row is None
            else _pack_rows(lengths, int(max_tokens_per_row)))
    R = len(bins)
    L = max(sum(lengths[i] for i in b) for b in bins)

    ids = torch.full((R, L), int(pad_token_id), dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    # Per token: island id (unique per segment; unique per padding slot so padding attends only to
    # itself) and block id (0 = prompt, k = answer k), from which the mask follows.
    island = torch.arange(R * L, dtype=torch.long).view(R, L).neg_().sub_(1)
    block = torch.zeros((R, L), dtype=torch.long)
    rows: List[int] = []
    labels: List[int] = []
    seq: List[int] = []
    seg_no = 0
    for r, members in enumerate(bins):
        t = 0
        for i in members:
            s = segs[i]
            P = len(s.prompt)
            n = len(s)
            island[r, t:t + n] = seg_no
            seg_no += 1
            if P:
                ids[r, t:t + P] = torch.tensor(list(s.prompt), dtype=torch.long)
                pos[r, t:t + P] = torch.arange(P)
            a0 = t + P
            for k, (ans, sid) in enumerate(s.answers, 1):
                m = len(ans)
                ids[r, a0:a0 + m] = torch.tensor(list(ans), dtype=torch.long)
                pos[r, a0:a0 + m] = torch.arange(P, P + m)
                block[r, a0:a0 + m] = k
                # token j of the answer is predicted by the row before it: the last prompt row for j = 0
                first = 0 if P else 1  # no prompt: nothing predicts the first token (as when unshared)
                for j in range(first, m):
                    prev = (t + P - 1) if j == 0 else (a0 + j - 1)
                    rows.append(r * L + prev)
                    labels.append(int(ans[j]))
                    seq.append(sid)
                a0 += m
            t += n
    idx = torch.arange(L)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    same_island = island[:, :, None] == island[:, None, :]
    visible_block = (block[:, None, :] == 0) | (block[:, None, :] == block[:, :, None])
    mask = (same_island & visible_block & causal[None]).unsqueeze(1)
    return PackedBatch(
        input_ids=ids, position_ids=pos, attention_mask=mask,
        rows=torch.tensor(rows, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
        seq_ids=torch.tensor(seq, dtype=torch.long), num_seqs=sum(len(g.answers) for g in groups),
        num_tokens=sum(lengths), num_slots=R * L, layout="shared" if share_prompt else "unshared",
        segment_ids=island, block_ids=block,
    )


def pad_groups(groups: Sequence[Group], *, order: str = "answer_major", pad_token_id: int = 0) -> PackedBatch:
    """The plain padded layout: one right-padded row per sequence (row i = sequence i), 2D mask."""
    _check_groups(groups)
    numbers = sequence_numbers(groups, order)
    S = sum(len(g.answers) for g in groups)
    seqs: List[Optional[Tuple[Sequence[int], Sequence[int]]]] = [None] * S
    for g, nums in zip(groups, numbers):
        for a, s in zip(g.answers, nums):
            seqs[s] = (g.prompt, a)
    L = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((S, L), int(pad_token_id), dtype=torch.long)
    pos = torch.zeros((S, L), dtype=torch.long)
    mask = torch.zeros((S, L), dtype=torch.long)
    rows, labels, seq = [], [], []
    for s, (p, a) in enumerate(seqs):
        P, m = len(p), len(a)
        ids[s, :P + m] = torch.tensor(list(p) + list(a), dtype=torch.long)
        pos[s, :P + m] = torch.arange(P + m)
        mask[s, :P + m] = 1
        for j in range(0 if P else 1, m):
            rows.append(s * L + P + j - 1)
            labels.append(int(a[j]))
            seq.append(s)
    num_tokens = int(mask.sum())
    return PackedBatch(ids, pos, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       torch.tensor(seq, dtype=torch.long), S, num_tokens, S * L, "padded")


def layout_groups(groups: Sequence[Group], layout: str, *, max_tokens_per_row: Optional[int] = DEFAULT_MAX_TOKENS_PER_ROW,
                  order: str = "answer_major", pad_token_id: int = 0) -> PackedBatch:
    """:func:`pack_groups` (``shared`` / ``unshared``) or :func:`pad_groups` (``padded``) by name."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "padded":
        return pad_groups(groups, order=order, pad_token_id=pad_token_id)
    return pack_groups(groups, share_prompt=layout == "shared", max_tokens_per_row=max_tokens_per_row,
                       order=order, pad_token_id=pad_token_id)


def groups_from_examples(examples: Sequence[dict], prefix: str = "") -> Tuple[List[Group], str]:
    """Groups from tokenized examples (:func:`fastpref.hf.load_preferences`): ``(groups, kind)`` with kind
    ``"paired"`` (answers chosen, rejected) or ``"pointwise"`` (one completion; ``prefix="kl_"`` selects
    KTO's mismatched KL sequences)."""
    if not examples:
        raise ValueError("examples: empty batch")
    if prefix:
        return [Group(ex[prefix + "prompt_ids"], [ex[prefix + "completion_ids"]]) for ex in examples], "pointwise"
    if "chosen_ids" in examples[0]:
        return [Group(ex["prompt_ids"], [ex["chosen_ids"], ex["rejected_ids"]]) for ex in examples], "paired"
    if "completion_ids" in examples[0]:
        return [Group(ex["prompt_ids"], [ex["completion_ids"]]) for ex in examples], "pointwise"
    raise ValueError(f"examples: expected chosen_ids/rejected_ids or completion_ids, got keys {sorted(examples[0])}")
