"""Hugging Face integration: fused log-probs of any causal LM, and TRL-format preference data.

``transformers`` is never imported here; it is only needed to build the models you pass in."""
from fastpref.hf.data import (
    DataError,
    LoadReport,
    PreferenceCollator,
    PreferenceDataset,
    TokenizeOptions,
    load_preferences,
)
from fastpref.hf.model import FusedCausalLM, HiddenOutput, UnsupportedModelError, head_temperature, model_inputs

__all__ = [
    "DataError",
    "FusedCausalLM",
    "HiddenOutput",
    "LoadReport",
    "PreferenceCollator",
    "PreferenceDataset",
    "TokenizeOptions",
    "UnsupportedModelError",
    "head_temperature",
    "load_preferences",
    "model_inputs",
]
