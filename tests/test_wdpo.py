"""WDPO: rho = 0 is DPO; the penalty is the squared norm of d l_i / d(input embeddings); its parameter
gradients (double backward through the fused op) match the naive materialised-logits path."""
import pytest
import torch
from torch import nn

from fastpref.losses import FusedPreferenceLoss, dpo_loss, wdpo_loss, wdpo_penalty
from fastpref.ops import sequence_logps_ref

B, T, E, H, V, VOCAB_IN = 2, 11, 12, 16, 23, 19
S = 2 * B
BETA = 0.5


class TinyLM(nn.Module):
    """Embedding -> causal mixing + MLP -> hidden states; the lm_head weight is used by the op."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB_IN, E)
        self.mix = nn.Linear(E, H, bias=False)
        self.mlp = nn.Sequential(nn.Linear(E, H), nn.Tanh(), nn.Linear(H, H))
        self.lm_head = nn.Linear(H, V, bias=True)

    def hidden(self, embeds):
        steps = torch.arange(1, embeds.shape[1] + 1, dtype=embeds.dtype)[None, :, None]
        causal = torch.cumsum(self.mix(embeds), dim=1) / steps  # lets prompt embeddings reach responses
        return self.mlp(embeds) + causal


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_IN, (S, T), generator=gen)
    labels = torch.randint(0, V, (S, T), generator=gen)
    for i, (prompt, pad) in enumerate([(3, 1), (5, 0), (2, 3), (4, 2)]):
        labels[i, :prompt] = -100
        if pad:
            labels[i, T - pad:] = -100
    ref_logps = -40 + 3 * torch.randn(S, generator=gen)
    return ids, labels, ref_logps


def naive_per_sample(model, embeds, labels, ref_logps, **dpo_options):
    """Per-pair DPO losses on log-probs from the full-logits reference op."""
    out = sequence_logps_ref(model.hidden(embeds), model.lm_head.weight, labels, bias=model.lm_head.bias)
    return dpo_loss(out.logps[:B], out.logps[B:], ref_logps[:B], ref_logps[B:], beta=BETA,
                    chosen_counts=out.counts[:B], rejected_counts=out.counts[B:], **dpo_options)


def fused(model, embeds, labels, ref_logps, **options):
    module = FusedPreferenceLoss("wdpo", beta=BETA, **options)
    return module(model.hidden(embeds), model.lm_head.weight, labels, bias=model.lm_head.bias,
                  ref_logps=ref_logps, inputs_embeds=embeds)


def param_grads(model, loss):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rho_zero_is_dpo(loss_type):
    model = TinyLM()
    ids, labels, ref = make_batch()
    embeds = model.embed(ids)
    w = fused(model, embeds, labels, ref, rho=0.0, loss_type=loss_type)
    d = FusedPreferenceLoss(loss_type, beta=BETA)(model.hidden(embeds), model.lm_head.weight, labels,
                                                  bias=model.lm_head.bias, ref_logps=ref)
    torch.testing.assert_close(w.loss, d.loss, rtol=0, atol=0)
    for gw, gd in zip(param_grads(model, w.loss), param_grads(model, d.loss)):
        torch.testing.assert_close(gw, gd, rtol=0, atol=0)
    assert w.metrics.penalty is not None and bool((w.metrics.penalty > 0).all())


def test_penalty_is_squared_norm_of_embedding_gradient():
    model = TinyLM()
    ids, labels, ref = make_batch()
    embeds = model.embed(ids)
    out = fused(model, embeds, labels, ref, rho=0.1)
    # naive: one autograd.grad per pair, on the full-logits path
    losses = naive_per_sample(model, embeds, labels, ref).per_sample_loss
    expected = []
    for i in range(B):
        (g,) = torch.autograd.grad(losses[i], embeds, retain_graph=True)
        assert g[i].abs().sum() > 0 and g[B + i].abs().sum() > 0
        others = [j for j in range(S) if j not in (i, B + i)]
        assert g[others].abs().max() == 0  # pair i's loss sees only its own two sequences
        assert g[i, 0].abs().sum() > 0  # prompt positions contribute
        expected.append(g.pow(2).sum())
    torch.testing.assert_close(out.metrics.penalty, torch.stack(expected), rtol=1e-5, atol=1e-9)
    # the functional penalty with a (chosen, rejected) pair of embedding tensors agrees
    ce, re_ = embeds[:B], embeds[B:]
    losses2 = naive_per_sample(model, torch.cat([ce, re_]), labels, ref).per_sample_loss
    pen2 = wdpo_penalty(losses2, (ce, re_))
    torch.testing.assert_close(pen2, torch.stack(expected), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_parameter_gradients_match_naive_double_backward(variant, loss_type):
    model = TinyLM(seed=1)
    ids, labels, ref = make_batch(seed=1)
    rho = 0.3
    embeds = model.embed(ids)
    out = fused(model, embeds, labels, ref, rho=rho, variant=variant, loss_type=loss_type)

    embeds_n = model.embed(ids)
    hidden = model.hidden(embeds_n)
    pol = sequence_logps_ref(hidden, model.lm_head.weight, labels, bias=model.lm_head.bias)
    naive = wdpo_loss(pol.logps[:B], pol.logps[B:], ref[:B], ref[B:], embeds_n, beta=BETA, rho=rho,
                      variant=variant, loss_type=loss_type, chosen_counts=pol.counts[:B],
                      rejected_counts=pol.counts[B:])
    # and by hand: the formula from per-pair losses and their embedding gradients
    (g,) = torch.autograd.grad(naive.per_sample_loss.sum(), embeds_n, create_graph=True)
    pen = g.pow(2).flatten(1).sum(1)
    pen = pen[:B] + pen[B:]
    by_hand = ((naive.per_sample_loss + rho * pen).mean() if variant == "code"
               else naive.per_sample_loss.mean() + rho * pen.mean().sqrt())

    torch.testing.assert_close(out.loss, naive.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(naive.loss, by_hand, rtol=1e-6, atol=1e-7)
    grads_f = param_grads(model, out.loss)
    grads_n = param_grads(model, naive.loss)
    grads_h = param_grads(model, by_hand)
    names = [n for n, _ in model.named_parameters()]
    for name, gf, gn, gh in zip(names, grads_f, grads_n, grads_h):
        torch.testing.assert_close(gf, gn, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(gn, gh, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # the penalty really moves the parameters: its gradient is not the DPO gradient
    dpo_grads = param_grads(model, naive_per_sample(model, model.embed(ids), labels, ref,
                                                    loss_type=loss_type).loss)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads_f, dpo_grads))


def test_bad_inputs():
    model = TinyLM()
    ids, labels, ref = make_batch()
    embeds = model.embed(ids)
    losses = naive_per_sample(model, embeds, labels, ref).per_sample_loss
    with pytest.raises(ValueError, match="inputs_embeds: must require grad"):
        wdpo_penalty(losses, embeds.detach())
    with pytest.raises(ValueError, match="inputs_embeds: expected 4 rows"):
        wdpo_penalty(losses, embeds[:3])
    with pytest.raises(ValueError, match="does not depend"):
        wdpo_penalty(losses, torch.zeros(S, T, E, requires_grad=True))
    pc = torch.zeros(B, requires_grad=True)
    with pytest.raises(ValueError, match="loss_type"):
        wdpo_loss(pc, pc, pc.detach(), pc.detach(), pc, loss_type="aot")
    with pytest.raises(ValueError, match="variant"):
        wdpo_loss(pc, pc, pc.detach(), pc.detach(), pc, variant="sqrt")
    with pytest.raises(ValueError, match="rho"):
        wdpo_loss(pc, pc, pc.detach(), pc.detach(), pc, rho=-1.0)
