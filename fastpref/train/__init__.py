"""Preference optimisation of a causal LM with fused log-probs: :class:`Trainer` and
:class:`TrainConfig` (:mod:`fastpref.train.trainer`); the ``fastpref train`` command is
:mod:`fastpref.train.cli`."""
from fastpref.models import demo_data_path  # noqa: F401 - kept importable from here for old scripts
from fastpref.train.trainer import (
    REFERENCE_MODES,
    SCHEDULERS,
    Trainer,
    TrainConfig,
    disable_dropout,
    enable_checkpointing,
    latest_checkpoint,
    lr_lambda,
)

__all__ = [
    "REFERENCE_MODES",
    "SCHEDULERS",
    "Trainer",
    "TrainConfig",
    "disable_dropout",
    "enable_checkpointing",
    "latest_checkpoint",
    "lr_lambda",
]
