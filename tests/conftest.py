"""Shared test setup: the Triton interpreter flag, one-thread runs for tiny models, tiny LMs."""
import os

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before triton is
# imported anywhere in the session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not suffer from a busy machine (a 2-core box
    shared with other jobs makes two threads spin-wait on each other). Use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: ``tiny_lm(texts, arch="llama", vocab_size=300, seed=0) -> (model in eval mode,
    tokenizer)``, a random ``arch`` model with a byte-level BPE tokenizer trained on ``texts``."""
    from fastpref.models import tiny_model, tiny_tokenizer

    def make(texts, arch="llama", vocab_size=300, seed=0, **config):
        model, tok = tiny_model(arch, tokenizer=tiny_tokenizer(texts, vocab_size=vocab_size), seed=seed, **config)
        return model.eval(), tok

    return make


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in fp32 (the cached copy), once per module."""
    from fastpref.models import ModelNotFoundError, load_smollm2

    try:
        return load_smollm2("float32")
    except ModelNotFoundError as exc:  # a missing model is a failure, not a skip
        pytest.fail(str(exc))
