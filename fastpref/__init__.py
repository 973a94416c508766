"""fastpref: fast, memory-lean preference optimisation and LLM preference annotation."""
from fastpref.ops import SequenceLogpsOutput, available_backends, sequence_logps, sequence_logps_ref

__version__ = "0.1.0"


def has_cpp() -> bool:
    """Whether the native CPU extension ``fastpref._C`` is built and importable."""
    from fastpref.ops.cpp import has_cpp as _has_cpp

    return _has_cpp()


__all__ = [
    "__version__",
    "SequenceLogpsOutput",
    "available_backends",
    "has_cpp",
    "sequence_logps",
    "sequence_logps_ref",
]
