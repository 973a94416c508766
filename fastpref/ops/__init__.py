"""Every op of fastpref, its backends and its references.

* :func:`sequence_logps` (reference :func:`sequence_logps_ref`): fused, chunked per-sequence
  log-prob sums from hidden states and an lm_head, differentiable;
* :func:`restricted_logps` (reference :func:`restricted_logps_ref`): next-token log-probs of a few
  candidate tokens over the full vocabulary, inference only;
* :func:`backend_reasons`: why each backend can or cannot serve given inputs;
* :data:`IGNORE_INDEX`, :data:`DEFAULT_CHUNK_BYTES`: the constants every layer shares.
"""
from fastpref.ops.backends import BACKENDS, available_backends, backend_reasons
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES, IGNORE_INDEX
from fastpref.ops.logps import SequenceLogpsOutput, sequence_logps
from fastpref.ops.reference import sequence_logps_ref
from fastpref.ops.restricted import restricted_logps, restricted_logps_ref

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_BYTES",
    "IGNORE_INDEX",
    "SequenceLogpsOutput",
    "available_backends",
    "backend_reasons",
    "restricted_logps",
    "restricted_logps_ref",
    "sequence_logps",
    "sequence_logps_ref",
]
