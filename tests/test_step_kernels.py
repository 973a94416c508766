"""The packed step through other attention kernels: flex-attention block masks and varlen (flash) layouts.

flex_attention runs on the CPU here (transformers compiles it with inductor); flash attention cannot, so
its path (the ``unshared`` layout, no mask, sequence starts from position ids) is checked with an sdpa
model reporting a varlen kernel: transformers derives the same sequence boundaries from the position ids.
"""
import pytest
import torch

from fastpref.hf import FusedCausalLM
from fastpref.step import PreferenceStep, pack_groups, prefix_mask_support
from fastpref.step import attention as attention_mod
from fastpref.step.attention import flex_block_mask, mask_for_attention, packed_layout_support
from test_step_engine import (RTOL32, alone, assert_close_rel, assert_grads_close, dpo, grads, make_model,
                              random_groups, tok)  # noqa: F401  (tok: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def static_shapes(monkeypatch):
    """transformers compiles flex_attention; torch 2.13's CPU template fails to build the dynamic-shape
    recompile that a second batch shape triggers (``cur_kvSplitSize8`` undeclared): one static graph per
    shape instead (the GPU template is another code path)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("cap", [None, 13], ids=["one-row", "rows-of-13"])
def test_block_mask_equals_the_dense_mask(share, cap):
    groups = random_groups(1, 50, n_groups=6, n_answers=3)
    packed = pack_groups(groups, share_prompt=share, max_tokens_per_row=cap)
    R, _, L, _ = packed.attention_mask.shape
    bm = flex_block_mask(packed)
    dense = flex.create_mask(bm.mask_mod, R, 1, L, L, device="cpu")
    assert torch.equal(dense, packed.attention_mask), "block mask differs from the dense mask"
    assert bm.shape[-2:] == (L, L)
    # the test can fail: a neighbouring answer's keys are visible in the unshared causal mask
    assert not torch.equal(dense, torch.ones_like(dense).tril())


def _flex_case(arch, share, tok, device):
    model = make_model(arch, tok).to(device)
    model.set_attn_implementation("flex_attention")
    policy = FusedCausalLM(model)
    ok, reason = prefix_mask_support(policy)
    assert ok and "flex_attention" in reason
    step = PreferenceStep(policy, precision="fp32", share_prompt=share, max_tokens_per_row=24, log=pytest.fail)
    assert step.layout == ("shared" if share else "unshared")
    groups = random_groups(7, len(tok), n_groups=5)
    packed = step.pack_groups(groups)
    assert packed.input_ids.shape[0] >= 2
    assert isinstance(mask_for_attention(packed, policy.config, torch.float32), flex.BlockMask)
    return model, policy, step, groups, packed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # gpt2 has no flex_attention in transformers 5.24
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_flex_attention_pairs_match_the_plain_computation_fp32(arch, share, tok, static_shapes):
    """Values (the reference pass, annotation): torch 2.13 has no flex-attention backward on the CPU."""
    model, policy, step, groups, packed = _flex_case(arch, share, tok, "cpu")
    with torch.no_grad():
        out = step.logps(packed)
        model.set_attn_implementation("sdpa")  # the plain computation: sdpa, one sequence at a time
        want = alone(policy, groups)
    assert_close_rel(out.logps, want, RTOL32, "log-prob sums")
    ref = torch.randn(2 * len(groups)) - 20
    assert_close_rel(dpo(out.logps, ref), dpo(want, ref), RTOL32, "DPO loss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex-attention backward needs a GPU (torch 2.13 CPU: none)")
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_flex_attention_gradients_match_the_plain_computation_fp32(share, tok):
    model, policy, step, groups, packed = _flex_case("llama", share, tok, "cuda")
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    ref = torch.randn(2 * len(groups), device="cuda") - 20
    loss = dpo(step.logps(packed).logps, ref)
    got = grads(loss, params)
    model.set_attn_implementation("sdpa")
    want = grads(dpo(alone(policy, groups), ref), params)
    assert_grads_close(got, want, names, 1e-4)


def test_flex_attention_bf16_mixed_tracks_the_fp32_truth(tok, static_shapes):
    model = make_model("llama", tok)
    policy = FusedCausalLM(model)
    groups = random_groups(8, len(tok), n_groups=4)
    with torch.no_grad():
        truth = alone(policy, groups)
        sdpa = PreferenceStep(policy, precision="bf16-mixed", log=pytest.fail)
        err_sdpa = (sdpa.logps(sdpa.pack_groups(groups)).logps - truth).abs().max().item()
        model.set_attn_implementation("flex_attention")
        step = PreferenceStep(policy, precision="bf16-mixed", log=pytest.fail)
        assert step.layout == "shared"
        got = step.logps(step.pack_groups(groups)).logps
    err = (got - truth).abs().max().item()
    assert err > 0, "bf16 result equals fp32 exactly: autocast did not reach the model"
    assert err <= 2 * err_sdpa + 1e-3 * (1 + truth.abs().max().item()), (err, err_sdpa)


def test_varlen_kernel_packs_unshared_sequences_without_a_mask(tok, monkeypatch):
    model = make_model("llama", tok)
    policy = FusedCausalLM(model)
    groups = random_groups(9, len(tok), n_groups=5)
    with torch.no_grad():
        want = alone(policy, groups)
    # flash attention cannot run on the CPU: an sdpa model reporting a varlen kernel takes the same inputs
    # (no mask; transformers finds the sequence starts in the position ids)
    monkeypatch.setattr(attention_mod, "attn_implementation", lambda config: "flash_attention_2")
    ok, reason = packed_layout_support(policy)
    assert ok and "no prefix sharing" in reason
    assert not prefix_mask_support(policy)[0]
    lines = []
    step = PreferenceStep(policy, precision="fp32", max_tokens_per_row=20, log=lines.append)
    assert step.layout == "unshared"
    assert len(lines) == 1 and "prefix sharing off" in lines[0], lines
    packed = step.pack_groups(groups)
    assert packed.input_ids.shape[0] >= 2 and packed.fill < 1  # several rows, padding at row ends
    assert mask_for_attention(packed, policy.config, torch.float32) is None
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    out = step.logps(packed)
    assert_close_rel(out.logps, want, RTOL32, "varlen layout")
    monkeypatch.undo()
    ref = torch.randn(len(want)) - 20
    assert_grads_close(grads(dpo(out.logps, ref), params), grads(dpo(alone(policy, groups), ref), params), names,
                       RTOL32)


def test_varlen_kernel_refuses_a_layout_that_needs_a_mask(monkeypatch):
    packed = pack_groups(random_groups(2, 40), share_prompt=True)
    monkeypatch.setattr(attention_mod, "attn_implementation", lambda config: "flash_attention_3")
    with pytest.raises(ValueError, match="'shared' layout needs one"):
        mask_for_attention(packed, None, torch.float32)
