"""RLAIF labeler: the docs/methods.md#worked-numbers values (debiasing 0.664873, d-RLAIF 8.0 -> 0.5556), soft
labels equal the naive two-token softmax of the model's own logits in both orders, chain-of-thought
runs end to end, d-RLAIF scores whole candidate strings; tiny random models built here."""
import math

import pytest
import torch

from fastpref.annotate.rlaif import (
    PairExemplar,
    RLAIFConfig,
    RLAIFLabeler,
    debiased_preference,
    expected_score,
    rescale_score,
    soft_preference,
)
from fastpref.annotate.scoring import ScoringModel

TEXTS = ["Text - Summary 1 - Summary 2 - Preferred Summary=1 Preferred Summary=2 SCORE: 1 2 3 4 5 6 7 8 9 10 " * 3,
         "the cat sat on the mat all day long; a cat sat on a mat. dogs are great. Rationale: "]
RECORD = {"prompt": "The cat sat on the mat all day long.", "response_1": "A cat sat on a mat.",
          "response_2": "Dogs are great.", "label": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm(TEXTS, vocab_size=300, seed=5)


@torch.no_grad()
def naive_choice_logps(model, tok, text, choices):
    """log p(choice | text) from the model's own logits, whole strings (sum of conditionals)."""
    stripped = text.rstrip(" ")
    space = text[len(stripped):]
    p = tok(stripped, add_special_tokens=False)["input_ids"]
    out = []
    for c in choices:
        r = tok(space + c, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
        out.append(sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r)))
    return out


def test_worked_numbers():
    p_ab, p_ba = soft_preference(1.0, 0.0), soft_preference(0.4, 0.0)
    assert abs(p_ab - 0.731059) < 1e-6 and abs(p_ba - 0.598688) < 1e-6
    assert abs(debiased_preference(p_ab, p_ba) - 0.664873) < 1e-6  # docs/methods.md#worked-numbers
    assert abs(soft_preference(-800.0, 0.0)) < 1e-300 and soft_preference(800.0, 0.0) == 1.0
    torch.testing.assert_close(soft_preference(torch.tensor([1.0]), torch.tensor([0.0])), torch.tensor([0.731059]))
    probs = torch.tensor([0, 0, 0, 0, 0, 0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)
    s = float(expected_score(probs.log()))
    assert abs(s - 8.0) < 1e-12
    assert abs(rescale_score(s) - 0.5556) < 5e-5  # (8 - 5.5) / 4.5, the assumed map
    assert rescale_score(1.0) == -1.0 and rescale_score(10.0) == 1.0 and rescale_score(5.5) == 0.0


@pytest.mark.parametrize("chat", ["on", "off"])
@pytest.mark.parametrize("debias", [True, False], ids=["debias", "one_order"])
def test_soft_labels_match_naive_two_token_softmax(lm, chat, debias):
    model, tok = lm
    labeler = RLAIFLabeler(ScoringModel(model, tok, chat_template=chat), RLAIFConfig(debias=debias))
    (out,) = labeler.process([labeler.parse(RECORD, line=1)])
    rec = out.record
    ctx, a, b = RECORD["prompt"], RECORD["response_1"], RECORD["response_2"]
    text_ab = labeler.score_prompt(ctx, a, b)
    assert f"Text - {ctx}\nSummary 1 - {a}\nSummary 2 - {b}" in text_ab and text_ab.endswith("Preferred Summary=")
    assert ("<|im_start|>" in text_ab) == (chat == "on")
    l1, l2 = naive_choice_logps(model, tok, text_ab, ["1", "2"])
    p_ab = math.exp(l1) / (math.exp(l1) + math.exp(l2))
    assert abs(rec["p_order_ab"] - p_ab) < 1e-5
    if debias:
        m1, m2 = naive_choice_logps(model, tok, labeler.score_prompt(ctx, b, a), ["1", "2"])
        p_ba = math.exp(m2) / (math.exp(m1) + math.exp(m2))  # response 1 sits in slot 2
        assert abs(rec["p_order_ba"] - p_ba) < 1e-5
        assert abs(rec["ai_preference"] - 0.5 * (p_ab + p_ba)) < 1e-5
    else:
        assert "p_order_ba" not in rec and rec["ai_preference"] == rec["p_order_ab"]
    assert rec["ai_label"] == (1 if rec["ai_preference"] > 0.5 else 2)
    assert rec["agrees"] == (rec["ai_label"] == 1)


def test_few_shot_exemplars_and_dialogue_task(lm):
    model, tok = lm
    ex = PairExemplar("Hi there", "Hello! How can I help?", "Go away.", 1, rationale="The first is polite.")
    labeler = RLAIFLabeler(ScoringModel(model, tok, chat_template="off"),
                           RLAIFConfig(task="dialogue", preamble="detailed", exemplars=(ex,)))
    text = labeler.score_prompt("ctx", "r1", "r2")
    assert text.startswith(labeler.preamble) and "helpful" in labeler.preamble
    assert "Context - Hi there\nResponse 1 - Hello! How can I help?\nResponse 2 - Go away.\nPreferred Response=1" in text
    assert "The first is polite." not in text  # rationales only in chain-of-thought prompts
    assert "Rationale: The first is polite." in labeler.cot_prompt("ctx", "r1", "r2")
    assert text.endswith("Context - ctx\nResponse 1 - r1\nResponse 2 - r2\nPreferred Response=")


def test_chain_of_thought_end_to_end(lm):
    model, tok = lm
    scorer = ScoringModel(model, tok, batch_size=2)
    labeler = RLAIFLabeler(scorer, RLAIFConfig(cot=True, max_new_tokens=6))
    items = [labeler.parse(RECORD, line=1), labeler.parse({"prompt": "x", "chosen": "good", "rejected": "bad"}, line=2)]
    outs = labeler.process(items)
    for out, item in zip(outs, items):
        rec = out.record
        assert 0.0 < rec["ai_preference"] < 1.0 and len(rec["rationales"]) == 2
        # the rationale is the greedy continuation of the CoT prompt, then scored after the ending
        ctx, a, b = item.prompt, item.texts[0], item.texts[1]
        cot_text = labeler.cot_prompt(ctx, a, b)
        assert cot_text.endswith("Rationale:")
        (greedy,) = scorer.generate([scorer.prompt_ids(cot_text)], 6)
        assert rec["rationales"][0] == greedy.strip()
        l1, l2 = naive_choice_logps(model, tok, labeler.score_prompt(ctx, a, b, greedy), ["1", "2"])
        assert abs(rec["p_order_ab"] - 1 / (1 + math.exp(l2 - l1))) < 1e-5


def test_direct_scores_whole_candidate_strings(lm):
    model, tok = lm
    labeler = RLAIFLabeler(ScoringModel(model, tok, batch_size=4), RLAIFConfig(mode="direct"))
    recs = [{"prompt": "The cat sat.", "response": "A cat sat."},
            {"prompt": "The cat sat.", "chosen": "A cat sat.", "rejected": "Dogs."},
            {"prompt": "The cat sat.", "responses": ["Dogs.", "A cat sat.", "Cats."]}]
    outs = labeler.process([labeler.parse(r, line=i + 1) for i, r in enumerate(recs)])
    text = labeler.direct_prompt("The cat sat.", "A cat sat.")
    assert "SUMMARY: A cat sat." in text and text.endswith("SCORE: ")
    lp = naive_choice_logps(model, tok, text, [str(i) for i in range(1, 11)])
    probs = torch.softmax(torch.tensor(lp), -1)
    want = float((probs * torch.arange(1, 11, dtype=torch.float64)).sum())
    assert abs(outs[0].record["score"] - want) < 1e-4
    assert abs(outs[0].record["reward"] - (want - 5.5) / 4.5) < 1e-4
    assert abs(outs[1].record["chosen_score"] - want) < 1e-4
    assert outs[1].record["agrees"] == (outs[1].record["chosen_score"] > outs[1].record["rejected_score"])
    assert abs(outs[2].record["scores"][1] - want) < 1e-4 and len(outs[2].record["rewards"]) == 3
    assert all(1.0 <= s <= 10.0 for s in outs[2].record["scores"])


def test_pairs_emit_and_metrics(lm):
    model, tok = lm
    labeler = RLAIFLabeler(ScoringModel(model, tok), RLAIFConfig(emit="pairs"))
    (out,) = labeler.process([labeler.parse({**RECORD, "id": 3}, line=1)])
    rec = out.record
    assert rec["id"] == 3 and rec["ai_preference"] >= 0.5 and {"prompt", "chosen", "rejected"} <= set(rec)
    assert rec["chosen"] in (RECORD["response_1"], RECORD["response_2"]) and rec["chosen"] != rec["rejected"]
    recs = [{"ai_preference": 0.7, "ai_label": 1, "agrees": True, "p_order_ab": 0.8, "p_order_ba": 0.6},
            {"ai_preference": 0.5, "ai_label": 0, "agrees": False, "p_order_ab": 0.7, "p_order_ba": 0.3},
            {"ai_preference": 0.2, "ai_label": 2, "agrees": False, "p_order_ab": 0.3, "p_order_ba": 0.1}]
    m = RLAIFLabeler(ScoringModel(model, tok), RLAIFConfig()).metrics(recs)
    assert m["agreement_vs_human"] == pytest.approx(1.5 / 3)  # a tie counts one half
    assert m["same_position_preferred"] == pytest.approx(1 / 3)  # record 2 picked slot 1 in both orders
    assert m["mean_ai_preference"] == pytest.approx(1.4 / 3)


def test_malformed_records(lm):
    from fastpref.annotate.jsonl import RecordError

    model, tok = lm
    labeler = RLAIFLabeler(ScoringModel(model, tok), RLAIFConfig())
    for rec, msg in [({"prompt": "p", "responses": ["a", "b", "c"]}, "exactly 2"),
                     ({"prompt": "p", "response_1": "a"}, "response_2"),
                     ({"prompt": "p", "responses": ["a", "b"], "label": 3}, "expected 1 or 2"),
                     ({"prompt": "p", "response": "a"}, "expected 'responses'"),
                     ({"responses": ["a", "b"]}, "missing key")]:
        with pytest.raises(RecordError, match=msg):
            labeler.parse(rec, line=1)


def test_prompt_too_long_is_a_per_record_error(lm):
    model, tok = lm
    labeler = RLAIFLabeler(ScoringModel(model, tok, max_length=400), RLAIFConfig())
    short = {"prompt": "x", "responses": ["a", "b"]}
    outs = labeler.process([labeler.parse(short, line=1), labeler.parse({**RECORD, "prompt": "long " * 300}, line=2)])
    assert outs[0].record is not None and outs[0].error is None
    assert outs[1].record is None and "exceeds max_length=400" in outs[1].error
    cot = RLAIFLabeler(ScoringModel(model, tok, max_length=400), RLAIFConfig(cot=True, max_new_tokens=300))
    assert "exceeds max_length=400" in cot.process([cot.parse(short, line=1)])[0].error
    direct = RLAIFLabeler(ScoringModel(model, tok, max_length=400), RLAIFConfig(mode="direct"))
    assert "exceeds" in direct.process([direct.parse({"prompt": "y " * 300, "response": "a"}, line=1)])[0].error
