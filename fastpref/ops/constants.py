"""Constants shared by every layer (defined once here, imported everywhere)."""

#: Label of positions that are not scored (prompt, padding): PyTorch's ``cross_entropy`` default.
IGNORE_INDEX = -100

#: Default size in bytes of the one logits buffer a chunked op holds at a time.
DEFAULT_CHUNK_BYTES = 32 << 20
