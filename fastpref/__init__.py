"""fastpref: fast, memory-lean preference optimisation and LLM preference annotation.

The public API at the top (the rest lives in the subpackages: :mod:`fastpref.ops`,
:mod:`fastpref.losses`, :mod:`fastpref.hf`, :mod:`fastpref.train`, :mod:`fastpref.annotate`):

* :func:`sequence_logps` / :func:`sequence_logps_ref`: fused per-sequence log-probs and their
  reference; :class:`SequenceLogpsOutput`;
* :func:`restricted_logps`: candidate next-token log-probs over the full vocabulary;
* :class:`PreferenceObjective`: any preference loss from per-sequence log-probs;
  :class:`FusedPreferenceLoss`: the same from hidden states and the lm_head;
* :func:`backend_reasons`, :func:`has_cpp`: which backends can serve, and why not.
"""
from fastpref._version import __version__
from fastpref.losses import FusedPreferenceLoss, PreferenceObjective
from fastpref.ops import (
    SequenceLogpsOutput,
    available_backends,  # noqa: F401 - deprecated name of backend_reasons, kept for old code
    backend_reasons,
    restricted_logps,
    sequence_logps,
    sequence_logps_ref,
)
from fastpref.ops.backends import has_cpp

__all__ = [
    "__version__",
    "FusedPreferenceLoss",
    "PreferenceObjective",
    "SequenceLogpsOutput",
    "backend_reasons",
    "has_cpp",
    "restricted_logps",
    "sequence_logps",
    "sequence_logps_ref",
]
