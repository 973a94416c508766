"""Preference losses on per-sequence log-probs, and a fused module that computes them from hidden
states (see ``docs/methods.md`` for the formulas and their sources)."""
from fastpref.losses._common import BCOState, PointwiseLossOutput, PreferenceLossOutput
from fastpref.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from fastpref.losses.fused import FusedLossOutput, FusedPreferenceLoss
from fastpref.losses.kto import kto_loss
from fastpref.losses.objective import LOSS_NAMES, ObjectiveOutput, PreferenceObjective
from fastpref.losses.orpo import orpo_loss
from fastpref.losses.rm import soft_label_rm_loss
from fastpref.losses.robust import drdpo_loss, kldpo_loss, kldpo_weights, wdpo_loss, wdpo_penalty
from fastpref.losses.simpo import simpo_loss
from fastpref.losses.ulma import pointwise_dpo_loss, ulma_loss

__all__ = [
    "BCOState",
    "DPO_LOSS_TYPES",
    "FusedLossOutput",
    "FusedPreferenceLoss",
    "LOSS_NAMES",
    "ObjectiveOutput",
    "PointwiseLossOutput",
    "PreferenceLossOutput",
    "PreferenceObjective",
    "dpo_loss",
    "drdpo_loss",
    "kldpo_loss",
    "kldpo_weights",
    "kto_loss",
    "orpo_loss",
    "pointwise_dpo_loss",
    "simpo_loss",
    "soft_label_rm_loss",
    "ulma_loss",
    "wdpo_loss",
    "wdpo_penalty",
]


def __getattr__(name):
    if name == "FUSED_LOSSES":  # old name: it lists what the modules accept, fused or not
        import warnings

        warnings.warn("fastpref.losses.FUSED_LOSSES is deprecated: use LOSS_NAMES", DeprecationWarning, stacklevel=2)
        return LOSS_NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
