"""The core op: fused chunked sequence log-probs, its backends and its reference."""
from fastpref.ops.backends import BACKENDS, available_backends
from fastpref.ops.logps import SequenceLogpsOutput, sequence_logps
from fastpref.ops.reference import sequence_logps_ref

__all__ = ["BACKENDS", "available_backends", "SequenceLogpsOutput", "sequence_logps", "sequence_logps_ref"]
