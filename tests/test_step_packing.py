"""Layouts of fastpref.step.packing, checked against their definition without any model: for every
scored row, the keys it may attend, read back as (position, token) pairs, must be exactly its own
sequence's prefix, and its label the next token of that sequence; every answer token is scored once."""
import random

import pytest
import torch

from fastpref.step.packing import (Group, _first_fit_decreasing, _pack_rows, groups_from_examples, layout_groups,
                                   pack_groups, pad_groups, sequence_numbers)


def random_groups(seed, n_groups, n_answers, max_prompt=9, max_answer=6, min_prompt=1):
    rnd = random.Random(seed)
    tok = lambda n: [rnd.randrange(1, 50) for _ in range(n)]  # noqa: E731  (0 is the pad id)
    out = []
    for _ in range(n_groups):
        N = n_answers if isinstance(n_answers, int) else rnd.choice(n_answers)
        out.append(Group(tok(rnd.randint(min_prompt, max_prompt)), [tok(rnd.randint(1, max_answer)) for _ in range(N)]))
    return out


def sequences(groups, order="answer_major"):
    """sequence id -> (prompt, answer)"""
    seqs = {}
    for g, nums in zip(groups, sequence_numbers(groups, order)):
        for a, s in zip(g.answers, nums):
            seqs[s] = (list(g.prompt), list(a))
    return [seqs[s] for s in range(len(seqs))]


def check_layout(packed, groups, order="answer_major"):
    """Every scored row sees exactly its sequence's prefix, predicts its next token; full coverage."""
    seqs = sequences(groups, order)
    R, L = packed.input_ids.shape
    assert packed.num_seqs == len(seqs)
    assert packed.num_slots == R * L
    ids, pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    mask = packed.attention_mask
    scored = {s: [] for s in range(len(seqs))}
    for row, label, s in zip(packed.rows.tolist(), packed.labels.tolist(), packed.seq_ids.tolist()):
        prompt, answer = seqs[s]
        full = prompt + answer
        r, q = divmod(row, L)
        if mask.dim() == 4:
            keys = mask[r, 0, q].nonzero().squeeze(1).tolist()
        else:  # padded: causal within the row's real tokens
            assert bool(mask[r, q])
            keys = [k for k in range(q + 1) if mask[r, k]]
        seen = sorted((int(pos[r * L + k]), int(ids[r * L + k])) for k in keys)
        p = int(pos[row])
        assert seen == [(i, full[i]) for i in range(p + 1)], f"row {row} of sequence {s}"
        assert label == full[p + 1]
        scored[s].append(p + 1)
    for s, (prompt, answer) in enumerate(seqs):
        first = len(prompt) if prompt else 1  # with no prompt, nothing predicts the first answer token
        assert sorted(scored[s]) == list(range(first, len(prompt) + len(answer))), f"sequence {s}"


def check_padding_isolated(packed):
    """Every query sees itself (no fully masked row: no NaN in sdpa); a padding slot (id 0 here) sees
    only itself and no other slot sees it."""
    m = packed.attention_mask[:, 0]
    L = m.shape[-1]
    eye = torch.eye(L, dtype=torch.bool)
    assert bool(m[:, eye].all())
    pad = packed.input_ids == 0
    for r in range(m.shape[0]):
        for q in pad[r].nonzero().squeeze(1).tolist():
            assert m[r, q].nonzero().squeeze(1).tolist() == [q]
            assert m[r, :, q].nonzero().squeeze(1).tolist() == [q]


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("n_answers", [1, 2, 3, (1, 2, 4)], ids=["N1", "N2", "N3", "mixedN"])
@pytest.mark.parametrize("cap", [None, 7, 16, 40], ids=lambda c: f"cap{c}")
def test_packed_layout_is_each_sequence_alone(share, n_answers, cap):
    order = "group_major" if isinstance(n_answers, tuple) else "answer_major"
    for seed in range(3):
        groups = random_groups(seed, 5, n_answers)
        packed = pack_groups(groups, share_prompt=share, max_tokens_per_row=cap, order=order)
        check_layout(packed, groups, order)
        check_padding_isolated(packed)
        assert packed.layout == ("shared" if share else "unshared")


def test_padded_layout_is_each_sequence_alone():
    groups = random_groups(1, 4, 3)
    packed = pad_groups(groups)
    assert packed.attention_mask.shape == packed.input_ids.shape == (12, packed.input_ids.shape[1])
    check_layout(packed, groups)
    assert layout_groups(groups, "padded").num_tokens == packed.num_tokens


def test_pairs_are_chosen_first_and_the_last_prompt_row_repeats():
    groups = [Group([5, 6, 7], [[8, 9], [10]]), Group([11], [[12], [13, 14, 15]])]
    p = pack_groups(groups, max_tokens_per_row=None)
    # one row: [5 6 7 8 9 10 | 11 12 13 14 15] (longest segment first)
    assert p.input_ids.shape == (1, 11)
    # sequence ids: chosen of group 0 -> 0, of group 1 -> 1; rejected -> 2, 3
    by_seq = {s: [] for s in range(4)}
    for row, lab, s in zip(p.rows.tolist(), p.labels.tolist(), p.seq_ids.tolist()):
        by_seq[s].append((row, lab))
    assert [lab for _, lab in by_seq[0]] == [8, 9]
    assert [lab for _, lab in by_seq[2]] == [10]
    assert [lab for _, lab in by_seq[1]] == [12]
    assert [lab for _, lab in by_seq[3]] == [13, 14, 15]
    # the last prompt row predicts the first token of both answers
    assert by_seq[0][0][0] == by_seq[2][0][0]
    assert by_seq[1][0][0] == by_seq[3][0][0]
    # answers continue the prompt's positions; the rejected answer restarts at len(prompt)
    assert p.position_ids[0].tolist()[:6] == [0, 1, 2, 3, 4, 3]
    assert p.num_tokens == 11 and p.num_slots == 11 and p.fill == 1.0


def test_rows_respect_the_capacity_and_long_groups_get_their_own_row():
    groups = [Group([1] * 3, [[2] * 2, [3] * 2]), Group([4] * 20, [[5], [6]]), Group([7], [[8], [9]])]
    p = pack_groups(groups, max_tokens_per_row=8)
    lengths = sorted((row != 0).sum().item() for row in p.input_ids)  # 0 is the pad id, never a real token
    assert lengths == [3, 7, 22]  # 7 + 3 > 8; the 22-token group alone in its row
    assert p.input_ids.shape == (3, 22)
    check_layout(p, groups)


def test_first_fit_decreasing_fills_rows():
    assert _first_fit_decreasing([5, 4, 6], 10) == [[2, 1], [0]]
    groups = [Group([1] * 3, [[2], [3]]), Group([4] * 2, [[5], [6]]), Group([7] * 4, [[8], [9]])]
    p = pack_groups(groups, max_tokens_per_row=10)  # segments of 5, 4, 6 tokens
    # at capacity 10: rows [6, 4] and [5], 20 slots; at 6 (3/5 of it): three rows of 6, 18 slots
    assert p.input_ids.shape == (3, 6)
    check_layout(p, groups)


@pytest.mark.parametrize("seed", range(20))
def test_row_capacity_is_chosen_for_the_fewest_slots(seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 60) for _ in range(rnd.randint(1, 30))]
    cap = rnd.randint(20, 120)
    bins = _pack_rows(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    fill = [sum(lengths[i] for i in b) for b in bins]
    assert all(f <= cap or len(b) == 1 for f, b in zip(fill, bins)), "a row over the capacity"
    full = _first_fit_decreasing(lengths, cap)
    assert len(bins) * max(fill) <= len(full) * max(sum(lengths[i] for i in b) for b in full)


def test_prompt_and_answers_of_length_one_and_an_empty_prompt():
    groups = [Group([3], [[4], [5]]), Group([], [[6, 7, 8], [9]])]
    for share in (True, False):
        p = pack_groups(groups, share_prompt=share, max_tokens_per_row=4)
        check_layout(p, groups)
    check_layout(pad_groups(groups), groups)
    # nothing predicts the first token without a prompt (as in the unshared computation)
    assert pack_groups(groups).num_seqs == 4


def test_group_major_order_for_candidate_groups():
    groups = [Group([1, 2], [[3], [4], [5]]), Group([6], [[7, 8]])]
    assert sequence_numbers(groups, "group_major") == [[0, 1, 2], [3]]
    check_layout(pack_groups(groups, order="group_major"), groups, "group_major")


@pytest.mark.parametrize("bad, match", [
    (lambda: pack_groups([]), "groups: empty"),
    (lambda: pack_groups([Group([1], [])]), r"groups\[0\]: no answer"),
    (lambda: pack_groups([Group([1], [[2], []])]), r"groups\[0\].answers\[1\]: empty answer"),
    (lambda: pack_groups([Group([1], [[2]]), Group([1], [[2], [3]])]), "different answer counts"),
    (lambda: pack_groups([Group([1], [[2]])], max_tokens_per_row=0), "max_tokens_per_row"),
    (lambda: pack_groups([Group([1], [[2]])], order="zigzag"), "order"),
    (lambda: layout_groups([Group([1], [[2]])], "ragged"), "layout"),
])
def test_mistakes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_groups_from_examples():
    paired = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}]
    groups, kind = groups_from_examples(paired)
    assert kind == "paired" and groups[0].answers == [[3], [4, 5]]
    point = [{"prompt_ids": [1], "completion_ids": [2], "label": 1.0, "kl_prompt_ids": [1], "kl_completion_ids": [7]}]
    groups, kind = groups_from_examples(point)
    assert kind == "pointwise" and groups[0].answers == [[2]]
    groups, _ = groups_from_examples(point, prefix="kl_")
    assert groups[0].answers == [[7]]
    with pytest.raises(ValueError, match="expected chosen_ids"):
        groups_from_examples([{"prompt_ids": [1]}])


def test_to_moves_every_tensor():
    p = pack_groups(random_groups(0, 2, 2)).to("cpu")
    assert p.input_ids.device.type == "cpu" and p.layout == "shared"
