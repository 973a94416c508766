"""The preference step: prefix-shared, padding-free layouts and the engine that scores them.

Layer: between ``fastpref.train`` and ``fastpref.hf`` / ``fastpref.annotate`` (imports hf, losses, ops).
"""
from fastpref.step.attention import prefix_mask_support, probe_prefix_mask
from fastpref.step.engine import (PRECISIONS, PreferenceStep, autocast_context, default_precision,
                                  examples_logps, resolve_precision)
from fastpref.step.packing import (DEFAULT_MAX_TOKENS_PER_ROW, LAYOUTS, Group, PackedBatch,
                                   groups_from_examples, layout_groups, pack_groups, pad_groups)

__all__ = [
    "DEFAULT_MAX_TOKENS_PER_ROW",
    "Group",
    "LAYOUTS",
    "PRECISIONS",
    "PackedBatch",
    "PreferenceStep",
    "autocast_context",
    "default_precision",
    "examples_logps",
    "groups_from_examples",
    "layout_groups",
    "pack_groups",
    "pad_groups",
    "prefix_mask_support",
    "probe_prefix_mask",
    "resolve_precision",
]
