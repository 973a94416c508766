"""The public surface after issue 11: small top-level API, new names and their deprecated aliases, the
shared model spec / device / packing helpers, and the memory probes in fastpref.profiling."""
import pytest
import torch

import fastpref
from fastpref import models


def test_top_level_api_is_small_and_importable():
    assert 6 <= len(fastpref.__all__) <= 10
    for name in fastpref.__all__:
        assert getattr(fastpref, name) is not None


def test_backend_reasons_and_deprecated_alias():
    reasons = fastpref.backend_reasons("cpu", torch.float32)
    assert set(reasons) == {"cpp", "triton", "torch"} and reasons["torch"] == []
    with pytest.warns(DeprecationWarning, match="backend_reasons"):
        assert fastpref.ops.available_backends("cpu", torch.float32) == reasons
    with pytest.raises(ValueError, match="backend: unknown backend 'bogus'"):
        fastpref.ops.backends.check_backend_name("bogus")


def test_loss_names_and_deprecated_alias():
    from fastpref.losses import LOSS_NAMES

    with pytest.warns(DeprecationWarning, match="LOSS_NAMES"):
        from fastpref.losses import FUSED_LOSSES
    assert FUSED_LOSSES == LOSS_NAMES and "sigmoid" in LOSS_NAMES and "kto" in LOSS_NAMES


def test_triton_package_does_not_export_custom_ops():
    import fastpref.ops.triton as tr

    assert not [n for n in tr.__all__ if n.endswith("_op")]


def test_token_logps_function_has_an_accurate_name():
    from fastpref.ops import logps

    assert logps.SequenceLogps is logps.TokenLogps  # the old name is an alias


def test_constants_defined_once():
    from fastpref.hf import data
    from fastpref.ops import constants

    assert fastpref.ops.IGNORE_INDEX == constants.IGNORE_INDEX == data.IGNORE_INDEX == -100
    assert fastpref.ops.DEFAULT_CHUNK_BYTES == constants.DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_bytes", [1, 7 * 37 * 4, 1 << 20])
def test_restricted_logps_matches_reference(dtype, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g).to(dtype)
    w = torch.randn(37, 8, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    cands = [0, 5, 36, 5]
    got = fastpref.restricted_logps(h, w, cands, bias=b, temperature=0.8, chunk_bytes=chunk_bytes, backend="torch")
    want = fastpref.ops.restricted_logps_ref(h.double(), w.double(), cands, bias=b.double(), temperature=0.8)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    assert got.dtype == torch.float32 and got.shape == (11, 4)


def test_restricted_logps_errors_and_old_name():
    from fastpref.annotate.scoring import restricted_logprobs

    h, w = torch.randn(2, 4), torch.randn(5, 4)
    assert torch.equal(restricted_logprobs(h, w, [1], backend="torch"), fastpref.restricted_logps(h, w, [1], backend="torch"))
    with pytest.raises(ValueError, match="chunk_bytes"):
        fastpref.restricted_logps(h, w, [1], chunk_bytes=0)
    with pytest.raises(ValueError, match="temperature"):
        fastpref.restricted_logps(h, w, [1], temperature=0.0)
    with pytest.raises(ValueError, match="candidates"):
        fastpref.restricted_logps(h, w, [5])


def test_logits_chunks_cover_every_row_once():
    from fastpref.ops.chunks import logits_chunks

    h, w = torch.randn(10, 3), torch.randn(6, 3)
    seen = []
    for r0, r1, logits in logits_chunks(h, w, None, chunk_bytes=3 * 6 * 4):
        assert r1 - r0 <= 3
        torch.testing.assert_close(logits, h[r0:r1] @ w.t())
        seen += list(range(r0, r1))
    assert seen == list(range(10))
    assert list(logits_chunks(h[:0], w, None, 64)) == []


# -- model specs, devices, packing (fastpref.models) ------------------------------------------------


@pytest.mark.parametrize("spec,want", [("tiny", ("llama", 7)), ("tiny:gpt2", ("gpt2", 7)), ("tiny:qwen2:3", ("qwen2", 3)),
                                       ("tiny::2", ("llama", 2))])
def test_parse_tiny_spec(spec, want):
    assert models.parse_tiny_spec(spec, seed=7) == want


@pytest.mark.parametrize("spec,match", [("tiny:bert", "tiny architecture"), ("tiny:llama:x", "seed"),
                                        ("tiny:a:b:c", "expected tiny")])
def test_parse_tiny_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        models.parse_tiny_spec(spec)


def test_load_model_tiny_spec_matches_tiny_model():
    texts = ["hello world, a tiny corpus for a tiny tokenizer"]
    model, tok, desc = models.load_model("tiny:gpt2:3", texts=texts)
    ref, _ = models.tiny_model("gpt2", texts=texts, seed=3)
    assert model.config.model_type == "gpt2" and desc.startswith("tiny random gpt2")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_model_missing_path_says_so(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="never downloads"):
        models.load_model(str(tmp_path / "nope"))


def test_pick_device(monkeypatch):
    assert models.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if not torch.cuda.is_available():
        assert models.pick_device(None) == torch.device("cpu")
    assert models.pick_device("cuda").index == 1  # under torchrun, this process's GPU


def test_want_packing():
    model, _ = models.tiny_model("llama")
    assert models.want_packing(model, torch.device("cpu"), "on") is True
    assert models.want_packing(model, torch.device("cpu"), "off") is False
    assert models.want_packing(model, torch.device("cpu"), "auto") is False  # flash attention on GPU only


# -- profiling ------------------------------------------------------------------------------------------


def test_memory_probes_on_cpu():
    from fastpref.profiling import Timing, current_memory, peak_memory, reset_peak_memory

    reset_peak_memory("cpu")
    keep = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, written
    peak, now = peak_memory("cpu"), current_memory("cpu")
    assert peak is not None and now is not None and peak >= now - (1 << 20)
    del keep
    t = Timing([3.0, 1.0, 2.0])
    assert t.times == (3.0, 1.0, 2.0) and t.median == 2.0 and t.spread == 1.0


def test_train_command_accepts_the_shared_model_spec(tmp_path, capfd):
    from fastpref.cli import main

    rc = main(["train", "--model", "tiny:gpt2:1", "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0",
               "--output-dir", str(tmp_path), "--no-progress", "--no-save"])
    out = capfd.readouterr().out
    assert rc == 0 and "tiny random gpt2" in out


def test_scoring_model_logps_names_and_old_aliases():
    from fastpref.annotate.scoring import ScoringModel

    assert ScoringModel.candidate_logprobs is ScoringModel.candidate_logps
    assert ScoringModel.next_token_logprobs is ScoringModel.next_token_logps


def test_constants_are_assigned_only_in_ops_constants():
    import ast
    from pathlib import Path

    root = Path(fastpref.__file__).parent
    owners = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id in ("IGNORE_INDEX", "DEFAULT_CHUNK_BYTES"):
                        owners.setdefault(t.id, []).append(str(path.relative_to(root)))
    assert owners == {"IGNORE_INDEX": ["ops/constants.py"], "DEFAULT_CHUNK_BYTES": ["ops/constants.py"]}
