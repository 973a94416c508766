"""Regressions of issue 10 in the losses: #8 empty batches, #9 IPO token counts, #13 the fused module's
op options checked at construction."""
import pytest
import torch

from fastpref.losses import (
    FusedPreferenceLoss,
    dpo_loss,
    drdpo_loss,
    kldpo_loss,
    kto_loss,
    orpo_loss,
    pointwise_dpo_loss,
    simpo_loss,
    soft_label_rm_loss,
    ulma_loss,
)

E = torch.zeros(0)
N = torch.zeros(0, dtype=torch.long)
EMPTY_CALLS = {
    "dpo": lambda: dpo_loss(E, E, E, E),
    "dpo-reference-free": lambda: dpo_loss(E, E, reference_free=True),
    "ipo": lambda: dpo_loss(E, E, E, E, loss_type="ipo", chosen_counts=N, rejected_counts=N),
    "kldpo": lambda: kldpo_loss(E, E, E, E),
    "drdpo": lambda: drdpo_loss(E, E, E, E),
    "simpo": lambda: simpo_loss(E, E, N, N),
    "orpo": lambda: orpo_loss(E, E, N, N),
    "kto": lambda: kto_loss(E, E, torch.zeros(0, dtype=torch.bool), z0=0.0),
    "ulma": lambda: ulma_loss(E, E, N, N),
    "pointwise_dpo": lambda: pointwise_dpo_loss(E, E, N, N),
    "soft_label_rm": lambda: soft_label_rm_loss(E, E, E),
}


@pytest.mark.parametrize("name", list(EMPTY_CALLS))
def test_functional_losses_reject_an_empty_batch(name):
    # before: a NaN loss (mean over nothing), while FusedPreferenceLoss raised "hidden: empty batch"
    with pytest.raises(ValueError, match=r"_logps: empty batch|rewards_1: empty batch"):
        EMPTY_CALLS[name]()


def test_fused_module_empty_batch_error_is_the_same_kind():
    with pytest.raises(ValueError, match="empty batch"):
        FusedPreferenceLoss("sigmoid")(torch.zeros(0, 3, 4), torch.zeros(5, 4), torch.zeros(0, 3, dtype=torch.long),
                                       ref_logps=torch.zeros(0))


@pytest.mark.parametrize("bad", [0, -1])
@pytest.mark.parametrize("side", ["chosen_counts", "rejected_counts"])
def test_ipo_rejects_counts_below_one(bad, side):
    x = torch.zeros(2)
    counts = {"chosen_counts": torch.tensor([3, 2]), "rejected_counts": torch.tensor([1, 4])}
    counts[side] = torch.tensor([2, bad])
    # -1 is wrong for any loss (>= 0), 0 only for IPO, which divides each sum by its count (>= 1)
    with pytest.raises(ValueError, match=rf"{side}: ('ipo' length-averages: )?token counts must be >= [01], got {bad}"):
        dpo_loss(x, x, x, x, loss_type="ipo", **counts)


def test_negative_counts_rejected_everywhere():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_counts: token counts must be >= 0, got -1"):
        dpo_loss(x, x, x, x, chosen_counts=torch.tensor([1, -1]), rejected_counts=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="rejected_counts: token counts must be >= 0"):
        simpo_loss(x, x, torch.tensor([1, 1]), torch.tensor([-2, 1]))
    with pytest.raises(ValueError, match="counts: token counts must be >= 0"):
        ulma_loss(x, x, torch.tensor([1, 0]), torch.tensor([1.0, float("nan")]))


def test_ipo_counts_of_one_still_work():
    x = torch.tensor([-1.0, -2.0])
    out = dpo_loss(x, x - 1, x, x, loss_type="ipo", chosen_counts=torch.tensor([1, 1]),
                   rejected_counts=torch.tensor([1, 1]))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kwargs,name", [
    ({"chunk_bytes": 0}, "chunk_bytes"),
    ({"chunk_bytes": -5}, "chunk_bytes"),
    ({"chunk_bytes": True}, "chunk_bytes"),
    ({"chunk_bytes": 1.5}, "chunk_bytes"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"backend": "bogus"}, "backend"),
])
def test_fused_module_checks_op_options_at_construction(kwargs, name):
    # before: construction succeeded and the error came at the first forward
    with pytest.raises(ValueError, match=f"^{name}: "):
        FusedPreferenceLoss("sigmoid", **kwargs)
