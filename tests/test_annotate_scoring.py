"""Annotation scoring primitives: restricted-vocabulary log-probs equal the full log-softmax gathered at
the candidates; multi-token candidates equal the sum of their conditionals; batched sequence log-probs
equal the model's own logits; all on tiny random models built here (no downloads)."""
import pytest
import torch

from fastpref.annotate.scoring import (
    ScoringModel,
    move_trailing_space,
    restricted_logprobs,
    restricted_logprobs_ref,
)
from fastpref.annotate import scoring as scoring_mod
from fastpref.models import TINY_ARCHITECTURES, tiny_model
from fastpref.ops import backend_reasons

CPU_BACKENDS = [b for b, why in backend_reasons("cpu", torch.float32).items() if not why and b != "triton"]
TEXTS = ["the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 10 " * 3,
         "Preferred Summary=1 Preferred Response=2 SCORE: 10 Category: SAFETY REASONING CHAT"]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm(TEXTS, vocab_size=300, seed=3)


@torch.no_grad()
def naive_next_logprobs(model, prefix):
    logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


@torch.no_grad()
def naive_continuation(model, prefix, cont):
    """sum_k log p(cont_k | prefix, cont_<k) from the model's own logits (product of conditionals)."""
    ids = torch.tensor([list(prefix) + list(cont)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(prefix) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 3 * 97 * 4 + 8], ids=["one_chunk", "3row_chunks"])
def test_restricted_matches_full_log_softmax(backend, bias, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    n, h, v = 11, 16, 97
    hidden = torch.randn(n, h, generator=g) * 2
    weight = torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    cands = [5, 0, 96, 5, 42]
    got = restricted_logprobs(hidden, weight, cands, bias=b, temperature=0.7, backend=backend, chunk_bytes=chunk_bytes)
    want = restricted_logprobs_ref(hidden.double(), weight.double(), cands, bias=None if b is None else b.double(),
                                   temperature=0.7)
    assert got.shape == (n, len(cands)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


def test_restricted_fp64_and_errors():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    got = restricted_logprobs(hidden, weight, torch.tensor([1, 2]), backend="torch")
    torch.testing.assert_close(got, restricted_logprobs_ref(hidden, weight, [1, 2]), rtol=0, atol=1e-12)
    assert restricted_logprobs(hidden[:0], weight, [1], backend="torch").shape == (0, 1)
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        restricted_logprobs(hidden, weight, [30], backend="torch")
    with pytest.raises(ValueError, match="at least one"):
        restricted_logprobs(hidden, weight, [], backend="torch")


def test_next_token_logprobs_match_model_logits(lm):
    model, tok = lm
    scorer = ScoringModel(model, tok, batch_size=2)
    prefixes = [tok("the quick brown")["input_ids"], tok("Preferred Summary=")["input_ids"], tok("a")["input_ids"]]
    cands = [tok("1", add_special_tokens=False)["input_ids"][0], tok("2", add_special_tokens=False)["input_ids"][0], 7]
    got = scorer.next_token_logprobs(prefixes, cands)
    for i, p in enumerate(prefixes):
        want = naive_next_logprobs(model, p)[cands]
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cache", [True, False], ids=["kv_cache", "from_scratch"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_multi_token_candidates_are_products_of_conditionals(lm, arch, cache, monkeypatch):
    tok = lm[1]
    model = lm[0] if arch == "llama" else tiny_model(arch, tokenizer=tok, seed=4)[0].eval()
    if not cache:
        monkeypatch.setattr(ScoringModel, "_accepts_position_ids", property(lambda self: False))
    scorer = ScoringModel(model, tok, batch_size=2)
    strings = ["1", " 10", " SAFETY", "2", " REASONING"]
    cands = [scorer.encode(s) for s in strings]
    assert any(len(c) > 1 for c in cands) and any(len(c) == 1 for c in cands)
    prefixes = [scorer.encode("SCORE:"), scorer.encode("Category:"), scorer.encode("the lazy dog and the fox")]
    got = scorer.candidate_logprobs(prefixes, cands)
    for i, p in enumerate(prefixes):
        for j, c in enumerate(cands):
            assert abs(float(got[i, j]) - naive_continuation(model, p, c)) < 5e-5, (i, strings[j])


def test_sequence_logps_match_model_logits_across_padding(lm):
    model, tok = lm
    scorer = ScoringModel(model, tok, batch_size=2)  # 5 items: several micro-batches, right padding
    items = [(scorer.encode(p), scorer.encode(r) + [tok.eos_token_id]) for p, r in [
        ("the quick", " brown fox"), ("Preferred Summary=", "1"), ("a", " lazy dog jumps over the fox"),
        ("the", " 0 1 2 3"), ("Category: SAFETY", " CHAT")]]
    out = scorer.sequence_logps(items)
    for i, (p, r) in enumerate(items):
        assert int(out.counts[i]) == len(r)
        assert abs(float(out.logps[i]) - naive_continuation(model, p, r)) < 1e-4


def test_fit_truncates_prompt_and_rejects_unfit(lm):
    model, tok = lm
    scorer = ScoringModel(model, tok, max_length=6)
    assert scorer.fit([1, 2, 3, 4, 5], [7, 8]) == [2, 3, 4, 5]
    from fastpref.annotate.jsonl import RecordError

    with pytest.raises(RecordError, match="does not fit"):
        scorer.fit([1], [1] * 6)
    with pytest.raises(RecordError, match="empty response"):
        scorer.fit([1], [])


@torch.no_grad()
def test_generate_is_greedy(lm):
    model, tok = lm
    scorer = ScoringModel(model, tok, batch_size=2)
    prefixes = [scorer.encode("the quick brown"), scorer.encode("a"), scorer.encode("Preferred")]
    texts = scorer.generate(prefixes, max_new_tokens=4)
    for p, text in zip(prefixes, texts):  # batched left-padded generation == one-by-one argmax decoding
        ids = list(p)
        for _ in range(4):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert text == tok.decode(ids[len(p):], skip_special_tokens=True)


def test_move_trailing_space():
    assert move_trailing_space("SCORE: ", ["1", "10"]) == ("SCORE:", [" 1", " 10"])
    assert move_trailing_space("Preferred Summary=", ["1"]) == ("Preferred Summary=", ["1"])


# -- shared-prefix next-token scoring ---------------------------------------------------------------


def _spy_shared(monkeypatch):
    """Count the micro-batches that took the shared-prefix path."""
    taken = []
    original = ScoringModel._shared_last_hidden

    def spy(self, seqs):
        out = original(self, seqs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(ScoringModel, "_shared_last_hidden", spy)
    return taken


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("row_tokens", [2048, 70], ids=["one_row", "rows_of_70"])
def test_shared_prefix_next_token_logps_equal_the_unshared(lm, arch, row_tokens, monkeypatch):
    _, tok = lm
    model, _ = tiny_model(arch, tokenizer=tok, seed=4, initializer_range=0.3)
    model.eval()
    common = list(range(5, 45))  # 40 shared tokens: the judge's instructions and exemplars
    suffixes = [[7], [9, 3, 1], list(range(50, 75)), [11, 12], list(range(80, 97)), [4] * 6]
    prefixes = [common + s for s in suffixes] + [common[:30] + [2, 2]]  # shares only 30 with the rest
    cands = [3, 17, 150]
    monkeypatch.setattr(scoring_mod, "SHARED_ROW_TOKENS", row_tokens)
    taken = _spy_shared(monkeypatch)
    got = ScoringModel(model, tok, batch_size=8, chat_template="off").next_token_logps(prefixes, cands)
    assert taken == [True], "the common prefix was not shared"
    for i, p in enumerate(prefixes):
        want = naive_next_logprobs(model, p)[cands]
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=2e-5, msg=f"prefix {i}")
    off = ScoringModel(model, tok, batch_size=8, chat_template="off", share_prefix=False)
    torch.testing.assert_close(off.next_token_logps(prefixes, cands), got, rtol=0, atol=2e-5)
    assert taken == [True, False]


def test_short_common_prefix_and_single_prefix_are_not_shared(lm, monkeypatch):
    model, tok = lm
    taken = _spy_shared(monkeypatch)
    scorer = ScoringModel(model, tok, batch_size=4, chat_template="off")
    short = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9, 9]]
    got = scorer.next_token_logps(short, [5, 6])
    got1 = scorer.next_token_logps([list(range(3, 40))], [5, 6])
    assert taken == [False, False]
    for i, p in enumerate(short):
        torch.testing.assert_close(got[i].double(), naive_next_logprobs(model, p)[[5, 6]], rtol=0, atol=2e-5)
    torch.testing.assert_close(got1[0].double(), naive_next_logprobs(model, list(range(3, 40)))[[5, 6]],
                               rtol=0, atol=2e-5)


def test_shared_prefix_falls_back_for_a_sliding_window_model(lm, monkeypatch, capsys):
    _, tok = lm
    model, _ = tiny_model("qwen2", tokenizer=tok, seed=4, use_sliding_window=True, sliding_window=5,
                          max_window_layers=0)
    model.eval()
    prefixes = [list(range(5, 40)) + [k] * (k % 4 + 1) for k in range(4)]
    taken = _spy_shared(monkeypatch)
    got = ScoringModel(model, tok, batch_size=8, chat_template="off", name="judge").next_token_logps(prefixes, [3, 4])
    assert taken == [False]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("judge: ") and "sliding" in err[0], err
    for i, p in enumerate(prefixes):
        torch.testing.assert_close(got[i].double(), naive_next_logprobs(model, p)[[3, 4]], rtol=0, atol=2e-5)
