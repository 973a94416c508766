"""PreferenceStep (prefix-shared, packed) against the plain computation: every sequence scored alone by
FusedCausalLM, one unpadded row each. Values, the DPO loss and every parameter gradient (full fine-tune
and LoRA), fp32 to round-off and bf16 within the budget of the padded bf16 computation, on tiny random
Llama, Qwen2, GPT-2 (absolute positions) and GPT-NeoX models and on SmolLM2-135M. The tiny models use
initializer_range=0.3 so that a wrong position or a leaked token changes the log-probs by O(1)
(at the default 0.02 they barely depend on positions)."""
import random
from types import SimpleNamespace

import pytest
import torch

from fastpref.hf import FusedCausalLM, PreferenceCollator, load_preferences
from fastpref.losses import dpo_loss
from fastpref.models import tiny_model, tiny_tokenizer
from fastpref.step import Group, PreferenceStep, default_precision, prefix_mask_support, probe_prefix_mask
from fastpref.step import engine as engine_mod
from fastpref.step.engine import resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
RTOL32 = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(["the quick brown fox jumps over the lazy dog", "hello world, how are you today?"])


def make_model(arch, tok, **kw):
    model, _ = tiny_model(arch, tokenizer=tok, seed=3, initializer_range=0.3, **kw)
    return model


def random_groups(seed, vocab, n_groups=4, n_answers=2, max_prompt=12, max_answer=7):
    """Odd lengths, a prompt of length 1 and answers of length 1 included."""
    rnd = random.Random(seed)
    ids = lambda n: [rnd.randrange(vocab) for _ in range(n)]  # noqa: E731
    groups = [Group(ids(1), [ids(1) for _ in range(n_answers)])]
    for _ in range(n_groups - 1):
        groups.append(Group(ids(rnd.randint(2, max_prompt)), [ids(rnd.randint(1, max_answer)) for _ in range(n_answers)]))
    return groups


def alone(policy, groups, order="answer_major"):
    """The plain computation: every (prompt, answer) sequence alone, one unpadded row, [S] sums."""
    from fastpref.step.packing import sequence_numbers

    nums = sequence_numbers(groups, order)
    device = next(policy.parameters()).device
    S = sum(len(g.answers) for g in groups)
    out = [None] * S
    for g, ns in zip(groups, nums):
        for a, s in zip(g.answers, ns):
            ids = torch.tensor([list(g.prompt) + list(a)], device=device)
            labels = ids.clone()
            labels[0, :len(g.prompt)] = -100
            out[s] = policy(ids, labels=labels).logps[0]
    return torch.stack(out)


def dpo(logps, ref):
    B = logps.shape[0] // 2
    return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.5).loss


def grads(loss, params):
    return torch.autograd.grad(loss, params)


def assert_close_rel(got, want, rtol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * (1 + scale), f"{what}: max |err| {err:.3g} (scale {scale:.3g}, rtol {rtol})"


def assert_grads_close(got, want, names, rtol):
    for g, w, n in zip(got, want, names):
        assert w.abs().max() > 0, f"{n}: zero gradient (test cannot fail)"
        err = (g.double() - w.double()).norm().item()
        assert err <= rtol * w.double().norm().item() + 1e-9, f"{n}: |grad err| {err:.3g} vs |grad| {w.norm():.3g}"


# -- fp32: exact up to round-off ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_pairs_match_the_plain_computation_fp32(arch, share, tok):
    policy = FusedCausalLM(make_model(arch, tok))
    step = PreferenceStep(policy, precision="fp32", share_prompt=share, max_tokens_per_row=24, log=pytest.fail)
    assert step.layout == ("shared" if share else "unshared")
    groups = random_groups(0, len(tok), n_groups=5)
    groups.append(Group(list(range(30)), [[1, 2, 3], [4]]))  # longer than a row: a row of its own
    packed = step.pack_groups(groups)
    assert packed.input_ids.shape[0] >= 3
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    ref = torch.randn(2 * len(groups)) - 20

    out = step.logps(packed)
    want = alone(policy, groups)
    assert_close_rel(out.logps, want, RTOL32, "log-prob sums")
    assert out.counts.tolist() == [len(g.answers[k]) for k in range(2) for g in groups]
    loss = dpo(out.logps, ref)
    loss_want = dpo(want, ref)
    assert_close_rel(loss, loss_want, RTOL32, "DPO loss")
    assert_grads_close(grads(loss, params), grads(loss_want, params), names, RTOL32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_gradients_and_reference_pass_fp32(arch, tok):
    from peft import LoraConfig, get_peft_model

    base = make_model(arch, tok)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))
    policy = FusedCausalLM(peft_model)
    step = PreferenceStep(policy, precision="fp32", max_tokens_per_row=40, log=pytest.fail)
    groups = random_groups(1, len(tok), n_groups=4)
    packed = step.pack_groups(groups)
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert params and all("lora" in n for n in names)

    ref = step.reference_logps(packed)
    assert not ref.logps.requires_grad
    with policy.adapters_disabled():
        ref_want = alone(policy, groups).detach()
    assert_close_rel(ref.logps, ref_want, RTOL32, "reference (adapters off)")
    out = step.logps(packed)
    want = alone(policy, groups)
    assert (want - ref_want).abs().max() > 1e-2  # the adapters change the model: the two passes differ
    assert_close_rel(out.logps, want, RTOL32, "policy log-probs")
    loss, loss_want = dpo(out.logps, ref.logps), dpo(want, ref_want)
    assert_close_rel(loss, loss_want, RTOL32, "DPO loss")
    assert_grads_close(grads(loss, params), grads(loss_want, params), names, RTOL32)
    assert policy.training  # the reference pass restores train mode


@pytest.mark.parametrize("n_answers", [1, 3], ids=["pointwise", "3-candidates"])
def test_pointwise_and_candidate_groups_fp32(n_answers, tok):
    policy = FusedCausalLM(make_model("llama", tok))
    step = PreferenceStep(policy, precision="fp32", max_tokens_per_row=32, log=pytest.fail)
    groups = random_groups(2, len(tok), n_groups=5, n_answers=n_answers)
    groups[2] = Group(groups[2].prompt, [[7]] * n_answers)  # identical answers: their own, equal sums
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    weights = torch.randn(len(groups) * n_answers)
    out = step.logps(step.pack_groups(groups, order="group_major"))
    want = alone(policy, groups, order="group_major")
    assert_close_rel(out.logps, want, RTOL32, "log-prob sums")
    assert_grads_close(grads((out.logps * weights).sum(), params), grads((want * weights).sum(), params),
                       names, RTOL32)


def test_examples_in_the_collator_order(tok):
    """Tokenized examples (paired, point-wise and KTO's KL sequences) give what the collated batch gives."""
    policy = FusedCausalLM(make_model("qwen2", tok))
    step = PreferenceStep(policy, precision="fp32", pad_token_id=tok.pad_token_id, log=pytest.fail)
    collate = PreferenceCollator(tok.pad_token_id)
    paired = load_preferences([
        {"prompt": "the quick brown", "chosen": " fox", "rejected": " dog jumps over"},
        {"prompt": [{"role": "user", "content": "hello?"}], "chosen": [{"role": "assistant", "content": "hi"}],
         "rejected": [{"role": "assistant", "content": "how are you today"}]},
        {"prompt": "lazy", "chosen": " dog", "rejected": " fox"},
    ], tok).examples
    with torch.no_grad():
        assert_close_rel(step.logps(step.pack(paired)).logps, policy.logps(collate(paired)).logps, RTOL32, "paired")
        point = load_preferences([
            {"prompt": "the quick", "completion": " brown fox", "label": True},
            {"prompt": "hello world", "completion": " how are you", "label": False},
        ], tok, kl_pairs=True).examples
        batch = collate(point)
        assert_close_rel(step.logps(step.pack(point)).logps, policy.logps(batch).logps, RTOL32, "point-wise")
        assert_close_rel(step.logps(step.pack(point, prefix="kl_")).logps, policy.logps(batch, prefix="kl_").logps,
                         RTOL32, "KL sequences")


def test_eager_attention_gets_an_additive_mask(tok):
    model = make_model("llama", tok)
    model.set_attn_implementation("eager")
    policy = FusedCausalLM(model)
    step = PreferenceStep(policy, precision="fp32", max_tokens_per_row=30, log=pytest.fail)
    assert step.layout == "shared"
    groups = random_groups(4, len(tok))
    with torch.no_grad():
        assert_close_rel(step.logps(step.pack_groups(groups)).logps, alone(policy, groups), RTOL32, "eager")


# -- models that cannot take the mask ------------------------------------------------------------


def test_sliding_window_falls_back_to_padding_with_one_line(tok):
    model = make_model("qwen2", tok, use_sliding_window=True, sliding_window=3, max_window_layers=0)
    policy = FusedCausalLM(model)
    ok, reason = prefix_mask_support(policy)
    assert not ok and "sliding_attention" in reason
    # the numeric probe alone also sees that a prepared mask would drop the window
    ok, reason = probe_prefix_mask(policy)
    assert not ok and "differ" in reason
    lines = []
    step = PreferenceStep(policy, precision="fp32", log=lines.append)
    assert step.layout == "padded"
    assert len(lines) == 1 and "sliding" in lines[0] and "padded" in lines[0]
    groups = random_groups(5, len(tok))
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    out = step.logps(step.pack_groups(groups))
    want = alone(policy, groups)
    assert_close_rel(out.logps, want, RTOL32, "padded fallback")
    ref = torch.randn(len(want)) - 20
    assert_grads_close(grads(dpo(out.logps, ref), params), grads(dpo(want, ref), params), names, RTOL32)


def test_config_checks_name_the_reason(tok):
    def fake(**cfg):
        return SimpleNamespace(config=SimpleNamespace(model_type="fake", **cfg))

    assert prefix_mask_support(fake(_attn_implementation="flash_attention_2"))[1].startswith(
        "attn_implementation='flash_attention_2'")
    assert "attn_logit_softcapping" in prefix_mask_support(fake(_attn_implementation="sdpa", attn_logit_softcapping=50.0))[1]
    assert "ALiBi" in prefix_mask_support(SimpleNamespace(config=SimpleNamespace(model_type="bloom",
                                                                                  _attn_implementation="sdpa")))[1]
    assert prefix_mask_support(fake(_attn_implementation="sdpa"))[0]
    # a soft-capped llama config falls back (to be safe) and still gives the right numbers
    model = make_model("llama", tok)
    model.config.attn_logit_softcapping = 30.0
    policy = FusedCausalLM(model)
    lines = []
    step = PreferenceStep(policy, precision="fp32", log=lines.append)
    assert step.layout == "padded" and "attn_logit_softcapping" in lines[0]
    groups = random_groups(6, len(tok))
    with torch.no_grad():
        assert_close_rel(step.logps(step.pack_groups(groups)).logps, alone(policy, groups), RTOL32, "fallback")


# -- bf16 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_within_the_budget_of_the_padded_computation(arch, precision, tok):
    """Error against the fp32 truth at most twice the padded (unshared) bf16 computation's own error."""
    model = make_model(arch, tok)
    truth_policy = FusedCausalLM(model)
    groups = random_groups(7, len(tok), n_groups=5)
    ref = torch.randn(2 * len(groups)) - 20
    names = [n for n, p in truth_policy.named_parameters() if p.requires_grad]
    params = [p for p in truth_policy.parameters() if p.requires_grad]
    truth = alone(truth_policy, groups)
    truth_grads = grads(dpo(truth, ref), params)
    if precision == "bf16":
        model.to(torch.bfloat16)
    policy = FusedCausalLM(model)
    params = [p for p in policy.parameters() if p.requires_grad]
    results = {}
    for layout in ("shared", "padded"):
        step = PreferenceStep(policy, precision=precision, packing=layout != "padded", max_tokens_per_row=32,
                              log=pytest.fail)
        assert step.layout == layout
        out = step.logps(step.pack_groups(groups))
        results[layout] = (out.logps.detach(), [g.double() for g in grads(dpo(out.logps, ref), params)])
    err = {k: (v[0].double() - truth.double()).abs().max().item() for k, v in results.items()}
    atol = 1e-2 * (1 + truth.abs().max().item())
    assert err["padded"] > 0  # bf16 really ran
    assert err["shared"] <= 2 * err["padded"] + atol, err
    for i, n in enumerate(names):
        t = truth_grads[i].double()
        e = {k: (v[1][i] - t).norm().item() for k, v in results.items()}
        assert e["shared"] <= 2 * e["padded"] + 2e-2 * t.norm().item(), (n, e)


# -- precision option ------------------------------------------------------------------------------


def test_default_precision_follows_the_cpu_flags(monkeypatch):
    engine_mod._cpu_flags.cache_clear()
    monkeypatch.setattr(engine_mod, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert default_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(engine_mod, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert default_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(engine_mod, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert default_precision("cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bfloat16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision: expected auto, fp32, bf16-mixed, bf16"):
        resolve_precision("fp8", "cpu")


def test_option_mistakes_are_named(tok):
    policy = FusedCausalLM(make_model("llama", tok))
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        PreferenceStep(policy, max_tokens_per_row=0)
    with pytest.raises(ValueError, match="precision"):
        PreferenceStep(policy, precision="half")


# -- the real model ------------------------------------------------------------------------------


def test_smollm2_lora_pairs_match_the_plain_computation(smollm2):
    from peft import LoraConfig, get_peft_model

    model, tok = smollm2
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, init_lora_weights=False))
    try:
        policy = FusedCausalLM(peft_model)
        step = PreferenceStep(policy, precision="fp32", pad_token_id=tok.pad_token_id, log=pytest.fail)
        assert step.layout == "shared"
        examples = load_preferences([
            {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
             "chosen": [{"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "assistant", "content": "It is Berlin, I think."}]},
            {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five"},
        ], tok).examples
        packed = step.pack(examples)
        assert packed.input_ids.shape[0] == 1
        ref = step.reference_logps(packed).logps
        params = [p for p in policy.parameters() if p.requires_grad]
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        out = step.logps(packed)
        want = policy.logps(PreferenceCollator(tok.pad_token_id)(examples))
        assert_close_rel(out.logps, want.logps, RTOL32, "SmolLM2 log-prob sums")
        loss, loss_want = dpo(out.logps, ref), dpo(want.logps, ref)
        assert_close_rel(loss, loss_want, RTOL32, "DPO loss")
        assert_grads_close(grads(loss, params), grads(loss_want, params), names, 1e-4)
    finally:
        peft_model.unload()


# -- the Trainer uses the engine by default ------------------------------------------------------


def test_trainer_runs_the_shared_packed_step_by_default(tok):
    from fastpref.train import Trainer, TrainConfig

    rows = [{"prompt": "the quick brown", "chosen": " fox", "rejected": " dog jumps"},
            {"prompt": "hello world", "chosen": " how are you", "rejected": " today"}] * 2
    data = load_preferences(rows, tok)
    lines = []
    trainer = Trainer(make_model("llama", tok), data, TrainConfig(max_steps=1, batch_size=4, progress=False,
                                                                  max_tokens_per_row=16),
                      pad_token_id=tok.pad_token_id, log=lines.append)
    assert trainer.engine.layout == "shared" and trainer.precision == default_precision("cpu")
    assert any(f"prefix-shared + packed rows of <= 16 tokens; precision: {trainer.precision} (default for this "
               "device)" in line for line in lines), lines
    record = trainer.train()[0]
    assert record["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference (precomputed, same layout)
    unshared = Trainer(make_model("llama", tok), data, TrainConfig(max_steps=1, batch_size=4, progress=False,
                                                                   share_prompt=False, precision="fp32"),
                       pad_token_id=tok.pad_token_id, log=None)
    assert unshared.engine.layout == "unshared" and unshared.precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


# -- CDR annotation scores candidate groups in the shared-prompt layout ----------------------------


def test_cdr_shared_prompt_scores_equal_the_unshared_ones(tok):
    from fastpref.annotate.cdr import CDRAnnotator, CDRConfig, Exemplar, ExemplarBlock, Guidance
    from fastpref.annotate.scoring import ScoringModel

    strong = ScoringModel(make_model("llama", tok).eval(), tok, name="strong", batch_size=2, max_length=60)
    weak = ScoringModel(make_model("gpt2", tok).eval(), tok, name="weak", batch_size=2)
    guidance = Guidance("Judge how correct and kind the answer is.",
                        (ExemplarBlock("Be correct.", (Exemplar("2+2?", "4", "5", "4 is right."),)),))
    records = [
        {"prompt": "the quick brown fox?", "responses": ["jumps", "over the lazy dog", "hello", "fox fox"]},
        {"prompt": "how are you today?", "responses": ["world", "the quick brown fox jumps over the lazy dog " * 2]},
        {"prompt": "hello", "responses": ["a", "b", "the lazy dog", "c"]},
    ]
    scores = {}
    for share in (True, False):
        ann = CDRAnnotator(strong, weak, CDRConfig(guidance=guidance, emit="scores", share_prompt=share,
                                                   max_tokens_per_row=64))
        outs = ann.process([ann.parse(r, line=i + 1) for i, r in enumerate(records)])
        scores[share] = torch.tensor([s for o in outs for s in o.record["scores"]], dtype=torch.float64)
    # the plain path: every (prompt, response) alone, right-padded batches (ScoringModel.sequence_logps)
    ann = CDRAnnotator(strong, weak, CDRConfig(guidance=guidance, emit="scores", max_tokens_per_row=64))
    items = []
    for i, r in enumerate(records):
        item = ann.parse(r, line=i + 1)
        sp, _ = ann.prompts_for(item, "CHAT")
        s_prompt = strong.prompt_ids(strong.render(sp))
        for text in item.texts:
            resp = ann._response_ids(strong, text)
            items.append((strong.fit(s_prompt, resp), resp))
    assert len({tuple(p) for p, _ in items}) > len(records)  # max_length truncated some prompts differently
    got, want = ann.score(strong, items), strong.sequence_logps(items)
    assert torch.equal(got.counts, want.counts)
    assert_close_rel(got.logps, want.logps, RTOL32, "strong-model sums")
    assert_close_rel(scores[True], scores[False], RTOL32, "CDR rewards, shared vs unshared")
    assert scores[True].abs().max() > 0.1


def test_cdr_precision_option(tok):
    from fastpref.annotate.cdr import CDRAnnotator, CDRConfig
    from fastpref.annotate.scoring import ScoringModel

    with pytest.raises(ValueError, match="precision"):
        CDRConfig(precision="fp16")
    strong = ScoringModel(make_model("llama", tok).eval(), tok, name="strong")
    weak = ScoringModel(make_model("qwen2", tok).eval(), tok, name="weak")
    recs = [{"prompt": "the quick brown fox?", "responses": ["jumps", "over the lazy dog", "hello"]},
            {"prompt": "hello world", "responses": ["how are you", "today", "fox"]}]
    out = {}
    for precision, share in (("fp32", True), ("bf16-mixed", True), ("bf16-mixed", False)):
        ann = CDRAnnotator(strong, weak, CDRConfig(emit="scores", precision=precision, share_prompt=share))
        outs = ann.process([ann.parse(r, line=i + 1) for i, r in enumerate(recs)])
        out[precision, share] = torch.tensor([s for o in outs for s in o.record["scores"]], dtype=torch.float64)
    truth = out["fp32", True]
    err_shared = (out["bf16-mixed", True] - truth).abs().max().item()
    err_unshared = (out["bf16-mixed", False] - truth).abs().max().item()
    assert err_unshared > 0  # bf16 really ran
    assert err_shared <= 2 * err_unshared + 1e-2 * (1 + truth.abs().max().item()), (err_shared, err_unshared)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_every_layer_shares_one_saved_mask(precision, tok):
    """sdpa saves its mask for the backward; given a bool mask or another dtype it saves a converted copy
    per layer (R * L * L elements each). The engine's mask is already in the compute dtype: one storage."""
    model = make_model("llama", tok, num_layers=3)
    policy = FusedCausalLM(model)
    step = PreferenceStep(policy, precision=precision, log=pytest.fail)
    packed = step.pack_groups(random_groups(8, len(tok)))
    R, L = packed.input_ids.shape
    masks = set()

    def pack(t):
        if t.dim() == 4 and tuple(t.shape[-2:]) == (L, L):
            masks.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.logps(packed)
    assert len(masks) == 1
