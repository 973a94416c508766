"""RLAIF self-consistency (Lee et al., 2023): K rationales sampled at a temperature per order, each
scored, the preference distributions averaged. Checked exactly against a naive loop (one sequence at a
time, no KV cache, the model's own full logits, an independent inverse-CDF draw), reproducible, seeded
per input line (so batching and resume do not change it), and runnable from the command line."""
import json

import pytest
import torch

from fastpref.annotate import jsonl
from fastpref.annotate.jsonl import ResumableWriter
from fastpref.annotate.records import transcript
from fastpref.annotate.rlaif import RLAIFConfig, RLAIFLabeler, sample_seed, sample_token
from fastpref.annotate.runner import annotate_file
from fastpref.annotate.scoring import ScoringModel
from fastpref.cli import main
from fastpref.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Text - Summary 1 - Summary 2 - Preferred Summary=1 Preferred Summary=2 SCORE: 1 2 3 4 5 6 7 8 9 10 " * 3,
         "the cat sat on the mat all day long; a cat sat on a mat. dogs are great. Rationale: because it is"]
RECORDS = [
    {"prompt": "The cat sat on the mat all day long.", "response_1": "A cat sat on a mat.",
     "response_2": "Dogs are great.", "label": 1},
    {"prompt": "Dogs.", "response_1": "Great dogs are great.", "response_2": "A mat.", "label": 2},
    {"prompt": "A long day on a mat for the cat", "responses": ["the cat", "a dog sat all day"]},
]
K, T, NEW = 3, 1.3, 6


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer(TEXTS, vocab_size=300), seed=7)
    return model.eval(), tok


def labeler(lm, *, batch_size=4, seed=0, samples=K, debias=True, temperature=T, top_k=None):
    model, tok = lm
    cfg = RLAIFConfig(cot=True, samples=samples, temperature=temperature, seed=seed, max_new_tokens=NEW,
                      debias=debias, top_k=top_k)
    return RLAIFLabeler(ScoringModel(model, tok, batch_size=batch_size), cfg)


@torch.no_grad()
def naive_sample(model, tok, ids, seed, temperature, max_new, top_k=None):
    g = torch.Generator().manual_seed(seed)
    seq, new = list(ids), []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        if top_k is not None:
            kth = logits.sort(descending=True).values[top_k - 1]
            logits = torch.where(logits >= kth, logits, torch.tensor(float("-inf"), dtype=torch.float64))
        cdf = torch.softmax(logits / temperature, -1).cumsum(0)
        u = torch.rand((), generator=g, dtype=torch.float64)
        t = int((cdf <= u * cdf[-1]).sum())  # first token whose CDF exceeds the draw
        if t == tok.eos_token_id:
            break
        new.append(t)
        seq.append(t)
    return tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def naive_choice_logps(model, sm, text, choices):
    stripped = text.rstrip(" ")
    space = text[len(stripped):]
    p = sm.prompt_ids(stripped)
    out = []
    for c in choices:
        r = sm.encode(space + c)
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
        out.append(sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r)))
    return out


def naive_record(lab, model, tok, item, seed, debias=True, top_k=None):
    """The self-consistent soft preference of one record, one rationale at a time."""
    sm = lab.labeler
    ctx = transcript(item.prompt)
    orders = [(0, 1), (1, 0)] if debias else [(0, 1)]
    per_order, rationales = [], []
    for o, (x, y) in enumerate(orders):
        a, b = item.texts[x], item.texts[y]
        ids = sm.prompt_ids(lab.cot_prompt(ctx, a, b))
        ps, rs = [], []
        for i in range(K):
            r = naive_sample(model, tok, ids, sample_seed(seed, item.line, o, i), T, NEW, top_k).strip()
            l1, l2 = naive_choice_logps(model, sm, lab.score_prompt(ctx, a, b, r), ["1", "2"])
            ps.append(float(torch.sigmoid(torch.tensor(l1 - l2, dtype=torch.float64))))
            rs.append(r)
        per_order.append(ps)
        rationales.append(rs)
    p_ab = sum(per_order[0]) / K
    if not debias:
        return p_ab, per_order, rationales
    p_ba = 1.0 - sum(per_order[1]) / K
    return 0.5 * (p_ab + p_ba), per_order, rationales


@pytest.mark.parametrize("batch_size,top_k", [(1, None), (4, None), (4, 5)])
def test_matches_naive_loop(lm, batch_size, top_k):
    model, tok = lm
    lab = labeler(lm, batch_size=batch_size, seed=3, top_k=top_k)
    items = [lab.parse(rec, line) for line, rec in enumerate(RECORDS, 1)]
    outs = lab.process(items)
    for item, out in zip(items, outs):
        rec = out.record
        p, per_order, rationales = naive_record(lab, model, tok, item, 3, top_k=top_k)
        assert rec["rationales"] == rationales
        assert rec["p_order_ab_samples"] == pytest.approx(per_order[0], abs=1e-6)
        assert rec["p_order_ba_samples"] == pytest.approx([1 - q for q in per_order[1]], abs=1e-6)
        assert rec["ai_preference"] == pytest.approx(p, abs=1e-6)
        assert rec["p_order_ab"] == pytest.approx(sum(per_order[0]) / K, abs=1e-6)
    # the samples really differ (a sampler that ignored its draws would give K equal rationales)
    assert any(len(set(rs)) > 1 for out in outs for rs in out.record["rationales"])


def test_no_debias_matches_naive(lm):
    model, tok = lm
    lab = labeler(lm, debias=False, seed=1)
    item = lab.parse(RECORDS[0], 5)
    rec = lab.process([item])[0].record
    p, per_order, rationales = naive_record(lab, model, tok, item, 1, debias=False)
    assert rec["ai_preference"] == pytest.approx(p, abs=1e-6) and rec["rationales"] == rationales
    assert "p_order_ba" not in rec and "p_order_ba_samples" not in rec


def test_seeded_per_line_not_per_batch(lm):
    lab = labeler(lm, seed=11)
    items = [lab.parse(rec, line) for line, rec in enumerate(RECORDS, 1)]
    together = lab.process(items)
    alone = [lab.process([it])[0] for it in items]
    for t, a in zip(together, alone):  # same draws; floats only up to the batch's rounding
        assert t.record["rationales"] == a.record["rationales"]
        assert t.record["ai_preference"] == pytest.approx(a.record["ai_preference"], abs=1e-6)
    assert [o.record for o in labeler(lm, seed=11).process(items)] == [o.record for o in together]
    other = labeler(lm, seed=12).process(items)
    assert [o.record["rationales"] for o in other] != [o.record["rationales"] for o in together]


def test_sample_token_inverse_cdf():
    logits = torch.tensor([0.0, float("-inf"), 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = [sample_token(logits, 1.0, g) for _ in range(2000)]
    assert 1 not in draws  # zero probability is never drawn
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / len(draws)
    expect = torch.softmax(torch.tensor([0.0, -1e9, 1.0, 2.0], dtype=torch.float64), 0)
    assert torch.allclose(freq, expect, atol=0.04)
    cold = [sample_token(logits, 1e-3, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(cold) == {3}  # temperature -> 0: the argmax
    g = torch.Generator().manual_seed(1)
    assert {sample_token(logits, 100.0, g, top_k=2) for _ in range(200)} == {2, 3}  # only the 2 largest


def test_config_validation():
    with pytest.raises(ValueError, match="cot=True"):
        RLAIFConfig(samples=2)
    with pytest.raises(ValueError, match="temperature"):
        RLAIFConfig(cot=True, samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        RLAIFConfig(cot=True, samples=2, temperature=float("nan"))
    with pytest.raises(ValueError, match="samples"):
        RLAIFConfig(cot=True, samples=-1)
    with pytest.raises(ValueError, match="top_k"):
        RLAIFConfig(cot=True, samples=2, top_k=0)
    with pytest.raises(ValueError, match="pairwise"):
        RLAIFConfig(cot=True, samples=2, mode="direct")


class Killed(Exception):
    pass


def test_resume_is_byte_identical(lm, tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    annotate_file(labeler(lm), inp, full, batch_size=2, progress=False, log=lambda s: None)
    real = ResumableWriter.write
    count = {"n": 0}

    def write(self, line, record):
        if count["n"] == 3:
            self._fh.write(jsonl.dumps(record)[:20])
            self._fh.flush()
            raise Killed()
        count["n"] += 1
        real(self, line, record)

    with monkeypatch.context() as m:
        m.setattr(ResumableWriter, "write", write)
        with pytest.raises(Killed):
            annotate_file(labeler(lm), inp, part, batch_size=2, progress=False, log=lambda s: None)
    annotate_file(labeler(lm), inp, part, batch_size=2, resume=True, progress=False, log=lambda s: None)
    assert part.read_bytes() == full.read_bytes()
    # another temperature is another run: refused on --resume
    from fastpref.annotate.runner import AnnotationError

    with pytest.raises(AnnotationError, match=r"temperature \(1\.3 -> 0\.5\)"):
        annotate_file(labeler(lm, temperature=0.5), inp, part, batch_size=2, resume=True, progress=False)


def test_command_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "out.jsonl"
    base = ["annotate", "rlaif", "-i", str(inp), "-o", str(out), "--labeler", "tiny", "--no-progress",
            "--no-verify", "--max-new-tokens", "4"]
    assert main(base + ["--self-consistency", "2", "--temperature", "0.8", "--seed", "5", "--top-k", "40"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["rationales"]) == 2 and len(r["rationales"][0]) == 2 for r in recs)
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["config"]["samples"] == 2 and meta["config"]["temperature"] == 0.8 and meta["config"]["seed"] == 5
    assert meta["config"]["top_k"] == 40
    capsys.readouterr()
    assert main(base + ["--temperature", "0.8", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastpref annotate: --temperature applies to sampled rationales: add --self-consistency K"]
    assert main(base + ["--self-consistency", "0", "--overwrite"]) == 2
    assert "argument --self-consistency: expected an integer >= 1, got 0" in capsys.readouterr().err
