"""CDR annotator: rewards equal the difference of naive sequence log-probs (each model with its own
tokenizer and prompt boundary), customisation of T(x), pair-building rules, and routing with its
fallback to CHAT. Tiny random models and tokenizers built here."""
import random

import pytest
import torch

from fastpref.annotate.cdr import (
    CDRAnnotator,
    CDRConfig,
    DomainRouter,
    Exemplar,
    ExemplarBlock,
    Guidance,
    build_pair,
    customise,
    exemplar_blocks,
)
from fastpref.annotate.scoring import ScoringModel
from fastpref.models import tiny_model, tiny_tokenizer

TEXT_A = ["What is the capital of France? The capital of France is Paris. Berlin, obviously. " * 3]
TEXT_B = ["a week has seven days; count them yourself. SAFETY REASONING CHAT Category: " * 3]
PROMPT = "What is the capital of France?"
RESPONSES = ["Paris.", "The capital of France is Paris.", "Berlin, obviously."]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair_of_models():
    strong, tok_s = tiny_model("llama", tokenizer=tiny_tokenizer(TEXT_A, vocab_size=300), seed=1)
    weak, tok_w = tiny_model("qwen2", tokenizer=tiny_tokenizer(TEXT_B, vocab_size=280), seed=2)
    return (strong.eval(), tok_s), (weak.eval(), tok_w)


@torch.no_grad()
def naive_logp(model, tok, prompt_text, response, eos=True):
    """Sum of response-token log-probs from the model's own [1, T, V] logits; ``(sum, count)``."""
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r)), len(r)


def chat(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def annotator(pair_of_models, batch_size=2, router=None, **cfg):
    (s, ts), (w, tw) = pair_of_models
    return CDRAnnotator(ScoringModel(s, ts, name="strong", batch_size=batch_size),
                        ScoringModel(w, tw, name="weak", batch_size=batch_size), CDRConfig(**cfg), router=router)


@pytest.mark.parametrize("normalize", ["none", "mean"])
@pytest.mark.parametrize("eos", ["include", "exclude"])
def test_reward_is_difference_of_naive_logps(pair_of_models, normalize, eos):
    (s, ts), (w, tw) = pair_of_models
    ann = annotator(pair_of_models, normalize=normalize, eos=eos, emit="scores")
    item = ann.parse({"prompt": PROMPT, "responses": RESPONSES}, line=1)
    (out,) = ann.process([item])
    msgs = [{"role": "user", "content": PROMPT}]
    for y, got in zip(RESPONSES, out.record["scores"]):
        ls, ns = naive_logp(s, ts, chat(ts, msgs), y, eos == "include")
        lw, _ = naive_logp(w, tw, chat(tw, msgs), y, eos == "include")
        want = (ls - lw) / (ns if normalize == "mean" else 1)
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (y, got, want)


def test_customised_prompt_reaches_both_models(pair_of_models):
    (s, ts), (w, tw) = pair_of_models
    block = ExemplarBlock("Be correct.", (Exemplar("2+2?", "4", "5", "4 is right."),))
    ann = annotator(pair_of_models, guidance=Guidance("Judge facts.", (block,)), emit="scores")
    item = ann.parse({"prompt": PROMPT, "responses": RESPONSES[:2]}, line=7)
    sp, wp = ann.prompts_for(item, "CHAT")
    assert sp == wp
    assert sp[0] == {"role": "system", "content": "Judge facts."}
    assert sp[1]["content"] == ("Be correct.\n\nUser: 2+2?\nGood Assistant: 4\nBad Assistant: 5\n"
                                "Explanation: 4 is right.\n\nUser: " + PROMPT + "\nGood Assistant:")
    (out,) = ann.process([item])
    for y, got in zip(RESPONSES[:2], out.record["scores"]):
        want = naive_logp(s, ts, chat(ts, sp), y)[0] - naive_logp(w, tw, chat(tw, wp), y)[0]
        assert abs(got - want) < 1e-4 * max(1.0, abs(want))
    # one model, two prompts: the weak side without guidance or with its own system prompt
    sp2, wp2 = annotator(pair_of_models, guidance=Guidance("Judge facts."), weak_vanilla=True).prompts_for(item, "CHAT")
    assert wp2 == PROMPT and sp2[0]["content"] == "Judge facts."
    _, wp3 = annotator(pair_of_models, guidance=Guidance("Judge facts."), weak_system_prompt="Be sloppy.").prompts_for(item, "CHAT")
    assert wp3 == [{"role": "system", "content": "Be sloppy."}, {"role": "user", "content": PROMPT}]
    # shared template: the weak model reads the strong tokenizer's rendering (official code)
    shared = annotator(pair_of_models, shared_template=True, emit="scores")
    (out,) = shared.process([shared.parse({"prompt": PROMPT, "responses": RESPONSES[:1] * 2}, line=1)])
    text = chat(ts, [{"role": "user", "content": PROMPT}])
    want = naive_logp(s, ts, text, RESPONSES[0])[0] - naive_logp(w, tw, text, RESPONSES[0])[0]
    assert abs(out.record["scores"][0] - want) < 1e-4 * max(1.0, abs(want))


def test_customise_replaces_system_turn_and_keeps_vanilla_strings():
    msgs = [{"role": "system", "content": "old"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    out = customise(msgs, Guidance(""), ExemplarBlock("", (Exemplar("p", "g", "b"),)))
    assert out[0] == {"role": "system", "content": ""} and out[1]["content"] == "q1"
    assert out[3]["content"].endswith("User: q2\nGood Assistant:") and msgs[3]["content"] == "q2"
    assert customise("raw text", Guidance()) == "raw text"
    blocks = exemplar_blocks([{"prompt": "p", "good": "g", "bad": "b"},
                              {"criterion": "c", "examples": [{"prompt": "p", "good": "g", "bad": "b"}] * 2}])
    assert [len(b.examples) for b in blocks] == [1, 2]


def test_build_pair_rules():
    texts, scores = ["a", "b", "c", "d"], [1.0, 3.0, 2.0, 0.0]
    draws = {build_pair(texts, scores, rng=random.Random(seed)) for seed in range(60)}
    assert {c for c, _ in draws} == {1} and {r for _, r in draws} == {0, 2, 3}  # best vs a random other
    assert build_pair(texts, scores, rng=random.Random(5)) == build_pair(texts, scores, rng=random.Random(5))
    assert build_pair(texts, scores, mode="worst") == (1, 3)
    # a tie with the best is never the rejected one; the first of tied bests is chosen
    assert {build_pair(["x", "y", "z"], [2.0, 2.0, 1.0], rng=random.Random(s)) for s in range(20)} == {(0, 2)}
    assert build_pair(["x", "y"], [1.0, 1.0], rng=random.Random(0)) == "all candidates have the same score"
    assert "repeats" in build_pair(["same", "same"], [1.0, 0.0], rng=random.Random(0))
    # a duplicate of the best text is skipped over, a distinct worse one is used
    assert {build_pair(["s", "s", "t"], [2.0, 1.0, 0.5], rng=random.Random(k)) for k in range(20)} == {(0, 2)}
    assert build_pair(["only"], [1.0]) == "fewer than 2 candidates"


def test_pairs_output_and_seeding(pair_of_models):
    ann = annotator(pair_of_models, seed=3)
    rec = {"id": 9, "prompt": [{"role": "user", "content": PROMPT}], "responses": RESPONSES}
    first = [ann.process([ann.parse(rec, line=4)])[0].record for _ in range(2)]
    assert first[0] == first[1]
    out = first[0]
    assert out["id"] == 9 and out["prompt"] == rec["prompt"]
    assert out["chosen"] == [{"role": "assistant", "content": RESPONSES[out["chosen_index"]]}]
    assert out["chosen_score"] == max(out["scores"]) > out["rejected_score"]
    worst = annotator(pair_of_models, pairs="worst").process([ann.parse(rec, line=4)])[0].record
    assert worst["rejected_score"] == min(worst["scores"])
    ties = ann.process([ann.parse({"prompt": PROMPT, "responses": ["Paris.", "Paris."]}, line=5)])[0]
    assert ties.record is None and "same score" in ties.skipped
    paired = ann.process([ann.parse({"prompt": PROMPT, "chosen": RESPONSES[1], "rejected": RESPONSES[2]}, line=6)])[0]
    assert set(paired.record) >= {"chosen_score", "rejected_score", "correct"}
    assert paired.record["correct"] == (paired.record["chosen_score"] > paired.record["rejected_score"])
    assert ann.metrics([paired.record, out])["judged_pairs"] == 1


def test_routing_and_fallback_to_chat(pair_of_models):
    (s, ts), _ = pair_of_models
    labeler = ScoringModel(s, ts, name="labeler", batch_size=2)
    queries = ["How do I pick a lock?", "What is 17 * 23?", "Tell me about Paris."]
    probs = DomainRouter(labeler).probabilities(queries)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    # probabilities = softmax of the names' full-vocabulary continuation log-probs
    text = chat(ts, [{"role": "system", "content": DomainRouter(labeler).instruction},
                     {"role": "user", "content": queries[0]}]) + "Category:"
    with torch.no_grad():
        naive = torch.tensor([naive_logp(s, ts, text, " " + d, eos=False)[0] for d in ("SAFETY", "REASONING", "CHAT")], dtype=torch.float64)
    torch.testing.assert_close(probs[0].double(), torch.softmax(naive, -1), rtol=0, atol=1e-4)
    routed = DomainRouter(labeler).route(queries)
    assert routed == [("SAFETY", "REASONING", "CHAT")[int(i)] for i in probs.argmax(-1)]
    assert DomainRouter(labeler, min_prob=1.0).route(queries) == ["CHAT"] * 3  # not confident -> CHAT

    ann = annotator(pair_of_models, route=True, emit="scores")  # routing without a router
    items = [ann.parse({"prompt": q, "responses": RESPONSES[:2], **extra}, line=i + 1) for i, (q, extra) in
             enumerate([(queries[0], {}), (queries[1], {"domain": "reasoning"}), (queries[2], {"domain": "banana"})])]
    outs = ann.process(items)
    assert [o.record["domain"] for o in outs] == ["CHAT", "REASONING", "CHAT"]
    sp, wp = ann.prompts_for(items[1], "REASONING")  # built-in guidance: empty system turn + exemplar
    assert sp[0] == {"role": "system", "content": ""} and sp[1]["content"].endswith("\nGood Assistant:")
    assert ann.prompts_for(items[0], "CHAT")[0] == queries[0]  # CHAT stays vanilla
    routed_ann = annotator(pair_of_models, route=True, emit="scores", router=DomainRouter(labeler, min_prob=1.0))
    assert [o.record["domain"] for o in routed_ann.process(items[:1])] == ["CHAT"]


def test_malformed_records_raise_record_errors(pair_of_models):
    from fastpref.annotate.jsonl import RecordError

    ann = annotator(pair_of_models)
    for rec, msg in [({"responses": ["a", "b"]}, "missing key 'prompt'"),
                     ({"prompt": "p", "responses": ["a"]}, "at least 2"),
                     ({"prompt": "p", "responses": "a"}, "list of responses"),
                     ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
                     ({"prompt": "p"}, "expected 'responses'"),
                     ({"prompt": [{"role": "assistant", "content": "x"}], "responses": ["a", "b"]}, "no user turn"),
                     ({"prompt": "p", "responses": ["a", ""]}, "empty response")]:
        with pytest.raises(RecordError, match=msg):
            ann.parse(rec, line=1)


def test_unrenderable_prompt_is_a_per_record_error(pair_of_models):
    import copy

    (s, ts), (w, tw) = pair_of_models
    no_system = copy.deepcopy(ts)
    no_system.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('system role not supported') }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant: ")
    ann = CDRAnnotator(ScoringModel(s, no_system, name="strong"), ScoringModel(w, tw, name="weak"),
                       CDRConfig(guidance=Guidance("criteria"), emit="scores"))
    outs = ann.process([ann.parse({"prompt": PROMPT, "responses": RESPONSES}, line=1)])
    assert outs[0].record is None and "system role not supported" in outs[0].error
    vanilla = CDRAnnotator(ScoringModel(s, no_system, name="strong"), ScoringModel(w, tw, name="weak"),
                           CDRConfig(emit="scores"))
    assert vanilla.process([vanilla.parse({"prompt": PROMPT, "responses": RESPONSES}, line=1)])[0].record
