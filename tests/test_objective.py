"""PreferenceObjective: the one route from per-sequence log-probs to a loss. Same loss and gradients as
the functional losses, TRL-named metrics, BCO state, and clear errors."""
import pytest
import torch

from fastpref.losses import (
    FusedPreferenceLoss,
    ObjectiveOutput,
    PreferenceObjective,
    dpo_loss,
    kto_loss,
    simpo_loss,
)
from fastpref.ops import sequence_logps_ref

B = 3
BETA = 0.2


def _paired(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-10 * torch.rand(2 * B, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    ref = (-10 * torch.rand(2 * B, generator=g, dtype=torch.float64)).to(dtype)
    counts = torch.tensor([3, 1, 7, 4, 2, 5])
    return logps, ref, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paired_matches_functional_values_and_grads(dtype):
    logps, ref, counts = _paired(dtype)
    out = PreferenceObjective("ipo", beta=BETA)(logps, counts=counts, ref_logps=ref)
    assert isinstance(out, ObjectiveOutput)
    (g_obj,) = torch.autograd.grad(out.loss, logps)
    want = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=BETA, loss_type="ipo",
                    chosen_counts=counts[:B], rejected_counts=counts[B:])
    (g_fn,) = torch.autograd.grad(want.loss, logps)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_obj, g_fn, rtol=0, atol=0)
    m = out.metrics
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    torch.testing.assert_close(m["rewards/chosen"], want.chosen_rewards.mean())
    torch.testing.assert_close(m["rewards/rejected"], want.rejected_rewards.mean())
    torch.testing.assert_close(m["rewards/margins"], want.margins.mean())
    torch.testing.assert_close(m["rewards/accuracies"], want.accuracy)
    torch.testing.assert_close(m["logps/chosen"], logps[:B].detach().mean())
    torch.testing.assert_close(m["logps/rejected"], logps[B:].detach().mean())


def test_reference_free_loss_takes_no_reference():
    logps, _, counts = _paired()
    out = PreferenceObjective("simpo", beta=BETA, gamma=0.3)(logps, counts=counts)
    want = simpo_loss(logps[:B], logps[B:], counts[:B], counts[B:], beta=BETA, gamma=0.3)
    torch.testing.assert_close(out.loss, want.loss)


def test_pointwise_metrics_split_by_label():
    logps, ref, counts = _paired()
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    kl, ref_kl = torch.randn(6), torch.randn(6)
    obj = PreferenceObjective("kto", beta=BETA)
    assert obj.layout == "pointwise" and obj.needs_kl
    out = obj(logps, counts=counts, ref_logps=ref, sample_labels=labels, kl_logps=kl, ref_kl_logps=ref_kl)
    want = kto_loss(logps, ref, labels, kl, ref_kl, beta=BETA)
    torch.testing.assert_close(out.loss, want.loss)
    pos = labels.bool()
    torch.testing.assert_close(out.metrics["rewards/chosen"], want.rewards[pos].mean())
    torch.testing.assert_close(out.metrics["rewards/rejected"], want.rewards[~pos].mean())
    torch.testing.assert_close(out.metrics["logps/chosen"], logps.detach()[pos].mean())
    torch.testing.assert_close(out.metrics["kl"], want.kl)
    # all samples on one side: the other side's means are 0, not NaN
    out = obj(logps, counts=counts, ref_logps=ref, sample_labels=torch.ones(6), kl_logps=kl, ref_kl_logps=ref_kl)
    assert float(out.metrics["rewards/rejected"]) == 0.0


def test_matches_fused_module():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 * B, 7, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2 * B, 7), generator=g)
    labels[:, :2] = -100
    ref = -torch.rand(2 * B, generator=g) * 20
    fused = FusedPreferenceLoss("sigmoid", beta=BETA)(hidden, weight, labels, ref_logps=ref)
    r = sequence_logps_ref(hidden, weight, labels)
    out = PreferenceObjective("sigmoid", beta=BETA)(r.logps, counts=r.counts, ref_logps=ref)
    torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_bco_state_updates_in_training_mode_only():
    logps, ref, counts = _paired()
    obj = PreferenceObjective("bco_pair", beta=BETA)
    first = obj(logps, counts=counts, ref_logps=ref)
    torch.testing.assert_close(obj.bco_mean, first.details.bco_state.mean)
    assert obj.bco_count.item() == 1.0 and set(obj.state_dict()) == {"bco_mean", "bco_count"}
    obj.eval()
    obj(logps, counts=counts, ref_logps=ref)
    assert obj.bco_count.item() == 1.0


def test_construction_does_not_touch_state():
    obj = PreferenceObjective("bco_pair")
    assert obj.bco_count.item() == 0.0


def test_errors_name_the_argument():
    logps, ref, counts = _paired()
    with pytest.raises(ValueError, match="logps: the paired layout needs an even number"):
        PreferenceObjective("sigmoid")(logps[:5], counts=counts[:5], ref_logps=ref[:5])
    with pytest.raises(ValueError, match="ref_logps: loss 'dpo' needs"):
        PreferenceObjective("sigmoid")(logps, counts=counts)
    with pytest.raises(ValueError, match="ref_logps: loss 'simpo' is reference-free"):
        PreferenceObjective("simpo")(logps, counts=counts, ref_logps=ref)
    with pytest.raises(ValueError, match="sample_labels: loss 'ulma' is point-wise"):
        PreferenceObjective("ulma")(logps, counts=counts, ref_logps=ref)
    with pytest.raises(ValueError, match="sample_labels: loss 'dpo' is paired"):
        PreferenceObjective("sigmoid")(logps, counts=counts, ref_logps=ref, sample_labels=torch.ones(6))
    with pytest.raises(ValueError, match="kl_logps: loss 'kto' needs"):
        PreferenceObjective("kto")(logps, counts=counts, ref_logps=ref, sample_labels=torch.ones(6))
    with pytest.raises(ValueError, match="logps: empty batch"):
        PreferenceObjective("sigmoid")(torch.zeros(0), counts=torch.zeros(0), ref_logps=torch.zeros(0))
    with pytest.raises(ValueError, match="counts: expected shape"):
        PreferenceObjective("sigmoid")(logps, counts=counts[:2], ref_logps=ref)
    with pytest.raises(TypeError, match="gamma: not an option of loss 'dpo'"):
        PreferenceObjective("sigmoid", gamma=1.0)


@pytest.mark.parametrize("logps", ["fused", "naive"])
def test_trainer_goes_through_the_public_objective(monkeypatch, logps):
    """Both log-prob paths of the Trainer reach the loss through PreferenceObjective.forward, and the
    trainer's logged reward metrics are the objective's TRL-named metrics."""
    from fastpref.hf import load_preferences
    from fastpref.models import demo_data_path, tiny_model, tiny_tokenizer
    from fastpref.train import Trainer, TrainConfig

    tok = tiny_tokenizer(open(demo_data_path()).read().splitlines(), vocab_size=400)
    model, _ = tiny_model("llama", tokenizer=tok, seed=0, hidden_size=32, num_layers=1)
    data = load_preferences(demo_data_path(), tok)
    data.examples = data.examples[:4]
    seen = []
    original = PreferenceObjective.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(PreferenceObjective, "forward", spy)
    cfg = TrainConfig(loss="sigmoid", batch_size=2, max_steps=1, progress=False, logps=logps, learning_rate=1e-3)
    trainer = Trainer(model, data, cfg, pad_token_id=tok.pad_token_id, log=None)
    record = trainer.train_step()
    assert seen, "the trainer computed a loss without PreferenceObjective.forward"
    last = seen[-1]
    assert record["loss"] == pytest.approx(float(last.loss.detach()), rel=1e-6)
    assert record["rewards/accuracies"] == pytest.approx(float(last.metrics["rewards/accuracies"]))
    assert record["rewards/margins"] == pytest.approx(float(last.metrics["rewards/margins"]), abs=1e-7)
