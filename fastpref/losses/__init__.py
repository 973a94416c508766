"""Preference losses on per-sequence log-probs, and a fused module that computes them from hidden
states (see ``METHODS.md`` for the formulas and their sources)."""
from fastpref.losses._common import BCOState, PointwiseLossOutput, PreferenceLossOutput
from fastpref.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from fastpref.losses.fused import FUSED_LOSSES, FusedLossOutput, FusedPreferenceLoss
from fastpref.losses.kto import kto_loss
from fastpref.losses.orpo import orpo_loss
from fastpref.losses.rm import soft_label_rm_loss
from fastpref.losses.robust import drdpo_loss, kldpo_loss, kldpo_weights, wdpo_loss, wdpo_penalty
from fastpref.losses.simpo import simpo_loss
from fastpref.losses.ulma import pointwise_dpo_loss, ulma_loss

__all__ = [
    "BCOState",
    "DPO_LOSS_TYPES",
    "FUSED_LOSSES",
    "FusedLossOutput",
    "FusedPreferenceLoss",
    "PointwiseLossOutput",
    "PreferenceLossOutput",
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
