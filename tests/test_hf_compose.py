"""FusedCausalLM goes through the wrapped model's own forward: hooks fire, autocast (the caller's or one
inside the model's forward, as accelerate installs it) applies to the head, ``DDP(model)`` runs its
reducer, ``torch.compile(model)`` runs the compiled graph, FSDP2 (``fully_shard``, 2 gloo processes)
equals one process; values and gradients equal the plain computation. Also the argument traps:
positional arguments after ``input_ids`` and a wrong label convention are errors, never wrong numbers."""
import copy
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from fastpref import sequence_logps
from fastpref.hf import FusedCausalLM
from fastpref.hf.model import IGNORE_INDEX
from fastpref.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(["the quick brown fox jumps over the lazy dog " * 4, "hello world"], vocab_size=300)


def batch(vocab, lengths=(10, 7, 12), prompts=(3, 2, 5), seed=0):
    """Right-padded [S, T] ids, HF-style labels (-100 on prompt and padding) and mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 3, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        seq = torch.randint(4, vocab, (n,), generator=g)
        ids[i, :n], labels[i, :n], mask[i, :n] = seq, seq, 1
        labels[i, :p] = IGNORE_INDEX
    return ids, labels, mask


def old_path(model, ids, labels, mask):
    """The pre-composition computation: the backbone called directly, then the op on the head weight."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    head = model.get_output_embeddings()
    return sequence_logps(hidden, head.weight, shifted, bias=head.bias)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected, atol=1e-6, rtol=1e-5):
    assert set(actual) == set(expected) and expected
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, atol=atol * float(g.abs().max()) + 1e-9, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


# -- the model's own forward -----------------------------------------------------------------------


def test_hooks_fire_and_the_head_projects_nothing(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=1)
    seen = {}
    model.register_forward_hook(lambda m, a, out: seen.setdefault("model", []).append(out.logits.shape))
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.setdefault("layer", []).append(1))
    model.lm_head.register_forward_hook(lambda m, a, out: seen.setdefault("head_rows", []).append(a[0].shape[1]))
    ids, labels, mask = batch(len(tok))
    out = FusedCausalLM(model)(ids, labels=labels, attention_mask=mask)
    assert len(seen["model"]) == 1 and seen["model"][0][1] == 0  # [S, 0, V] logits
    assert seen["layer"] == [1] and seen["head_rows"] == [0]
    torch.testing.assert_close(out.logps, old_path(model, ids, labels, mask).logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["caller", "inside_forward"])
def test_autocast_follows_the_models_forward(tok, where):
    """bf16 autocast (CPU): fused log-probs track the model's own autocast logits; the only difference
    left is the rounding of the logits to bf16 (the fused op keeps them in fp32)."""
    model, _ = tiny_model("llama", tokenizer=tok, seed=2, tie_word_embeddings=False)
    ids, labels, mask = batch(len(tok), seed=3)
    fused = FusedCausalLM(model)
    with torch.no_grad():
        fp32 = fused(ids, labels=labels, attention_mask=mask, return_token_logps=True).token_logps.double()
        if where == "inside_forward":
            # what accelerate's prepare_model(mixed_precision="bf16") does: autocast around model.forward
            model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
            ctx = torch.autocast("cpu", enabled=False)
        else:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        with ctx:
            amp = fused(ids, labels=labels, attention_mask=mask, return_token_logps=True).token_logps.double()
            naive = fused.naive_logps(ids, labels=labels, attention_mask=mask,
                                      return_token_logps=True).token_logps.double()
            h = fused.hidden(ids, labels=labels, attention_mask=mask)
    assert h.hidden.dtype == h.weight.dtype == torch.bfloat16
    shift = (fp32 - naive).abs().max().item()  # what bf16 changes in the whole network
    err = (amp - naive).abs().max().item()
    assert shift > 5e-4, "autocast had no effect on the model's own logits"
    # logits rounded to bf16 move a log-prob by at most ~|logit| * 2^-8
    assert err <= 0.25 * shift and err <= 0.05, f"fused vs model logits under autocast: {err:.3g} (bf16 shift {shift:.3g})"


def test_ddp_wrapped_model(tok):
    """FusedCausalLM(DDP(model)) in a 1-process gloo group: DDP's reducer all-reduces the gradients
    (a counting comm hook sees every bucket) and values/gradients equal the bare model's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = tiny_model("qwen2", tokenizer=tok, seed=4)
    ids, labels, mask = batch(len(tok), seed=5)
    g = torch.tensor([0.3, -1.0, 0.7])
    bare = copy.deepcopy(model)
    (FusedCausalLM(bare)(ids, labels=labels, attention_mask=mask).logps * g).sum().backward()

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DDP(model)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, counting_allreduce)
        fused = FusedCausalLM(ddp)
        assert fused.causal_lm is model and fused.model is ddp
        out = fused(ids, labels=labels, attention_mask=mask)
        (out.logps * g).sum().backward()
    finally:
        torch.distributed.destroy_process_group()
    assert calls, "DDP's reducer never ran"
    assert_grads_close(grads_of(model), grads_of(bare))


def test_compiled_model_runs_its_graph(tok):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, _ = tiny_model("llama", tokenizer=tok, seed=6, hidden_size=32, num_layers=1)
    ids, labels, mask = batch(len(tok), seed=7)
    expected = FusedCausalLM(copy.deepcopy(model))(ids, labels=labels, attention_mask=mask).logps
    counter = CompileCounter()
    fused = FusedCausalLM(torch.compile(model, backend=counter))
    out = fused(ids, labels=labels, attention_mask=mask)
    assert counter.frame_count >= 1 and counter.op_count > 0, "the compiled graph was not used"
    frames = counter.frame_count
    again = fused(ids, labels=labels, attention_mask=mask)
    assert counter.frame_count == frames, "recompiled for an identical call"
    torch.testing.assert_close(out.logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.logps, expected, atol=1e-5, rtol=0)
    out.logps.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    torch._dynamo.reset()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_full_finetune_gradients_equal_the_old_path(tok, tie):
    model, _ = tiny_model("gpt2", tokenizer=tok, seed=8, tie_word_embeddings=tie)
    ids, labels, mask = batch(len(tok), seed=9)
    g = torch.tensor([1.0, -0.5, 2.0])
    old = copy.deepcopy(model)
    (old_path(old, ids, labels, mask).logps * g).sum().backward()
    new = FusedCausalLM(model)
    (new(ids, labels=labels, attention_mask=mask).logps * g).sum().backward()
    assert_grads_close(grads_of(model), grads_of(old))


def test_lora_gradients_equal_the_old_path(tok):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_model("llama", tokenizer=tok, seed=10)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids, labels, mask = batch(len(tok), seed=11)
    old = copy.deepcopy(peft_model)
    old_path(old.get_base_model(), ids, labels, mask).logps.sum().backward()
    fused = FusedCausalLM(peft_model)
    fused(ids, labels=labels, attention_mask=mask).logps.sum().backward()
    new_grads, old_grads = grads_of(peft_model), grads_of(old)
    assert new_grads and all("lora_" in n for n in new_grads)
    assert_grads_close(new_grads, old_grads)
    with torch.no_grad(), fused.adapters_disabled():
        ref = fused(ids, labels=labels, attention_mask=mask).logps
    with torch.no_grad(), old.disable_adapter():
        expected = old_path(old.get_base_model(), ids, labels, mask).logps
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)


# -- FSDP2 -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_LAYOUTS = {
    # name: (tie_word_embeddings, shard the lm_head as its own unit)
    "head_in_root": (True, False),  # the usual recipe: unsharded after the forward
    "head_own_unit": (False, True),  # resharded after the forward: a DTensor, gathered by the wrapper
}


def _fsdp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        setup = torch.load(path, weights_only=False)
        (ids, labels, mask), g = setup["batch"], setup["g"]
        n = ids.shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        results = {}
        for name, (_, own_unit) in FSDP_LAYOUTS.items():
            model = setup["models"][name]
            for layer in model.model.layers:
                fully_shard(layer)
            if own_unit:
                fully_shard(model.lm_head)
            fully_shard(model)
            assert isinstance(model.lm_head.weight, DTensor)
            out = FusedCausalLM(model)(ids[rows], labels=labels[rows], attention_mask=mask[rows])
            # FSDP averages gradients over ranks: the per-rank loss is the mean over its own rows
            (out.logps * g[rows]).sum().mul(world / ids.shape[0]).backward()
            grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
            gathered = [torch.zeros(n) for _ in range(world)]
            torch.distributed.all_gather(gathered, out.logps.detach())
            results[name] = {"grads": grads, "logps": torch.cat(gathered)}
        if rank == 0:
            torch.save(results, path + ".out")
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_two_processes_equal_one(tok, tmp_path):
    models = {name: tiny_model("llama", tokenizer=tok, seed=12, hidden_size=32, num_layers=2,
                               tie_word_embeddings=tie)[0] for name, (tie, _) in FSDP_LAYOUTS.items()}
    data = batch(len(tok), lengths=(9, 6, 11, 8), prompts=(2, 1, 4, 3), seed=13)
    g = torch.tensor([1.0, -2.0, 0.5, 1.5])
    path = str(tmp_path / "setup.pt")
    torch.save({"models": models, "batch": data, "g": g}, path)
    mp.spawn(_fsdp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    sharded = torch.load(path + ".out", weights_only=False)

    ids, labels, mask = data
    for name, model in models.items():
        out = FusedCausalLM(model)(ids, labels=labels, attention_mask=mask)
        (out.logps * g).sum().div(ids.shape[0]).backward()
        torch.testing.assert_close(sharded[name]["logps"], out.logps.detach(), atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
        assert_grads_close(sharded[name]["grads"], grads_of(model), atol=1e-5)


# -- argument traps --------------------------------------------------------------------------------


def test_positional_arguments_after_input_ids_are_refused(tok):
    model, _ = tiny_model("llama", tokenizer=tok)
    ids, labels, mask = batch(len(tok))
    fused = FusedCausalLM(model)
    for call in (fused, fused.hidden, fused.naive_logps):
        with pytest.raises(TypeError, match="keyword-only"):
            call(ids, mask, labels)  # Hugging Face's order
    with pytest.raises(TypeError, match="labels= is required"):
        fused(ids, attention_mask=mask)


def test_label_conventions_are_explicit_and_checked(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=14)
    ids, labels, mask = batch(len(tok), seed=15)
    fused = FusedCausalLM(model).eval()
    aligned = torch.cat([labels[:, 1:], labels.new_full((3, 1), IGNORE_INDEX)], 1)
    with torch.no_grad():
        hf = fused(ids, labels=labels, attention_mask=mask).logps
        none = fused(ids, labels=aligned, attention_mask=mask, label_shift="none").logps
        assert torch.equal(hf, none)
        with pytest.raises(ValueError, match="look already shifted.*label_shift='none'"):
            fused(ids, labels=aligned, attention_mask=mask)
        with pytest.raises(ValueError, match="look unshifted.*label_shift='hf'"):
            fused(ids, labels=labels, attention_mask=mask, label_shift="none")
        with pytest.raises(ValueError, match="label_shift: expected"):
            fused(ids, labels=labels, attention_mask=mask, label_shift="shifted")
        # packed: the one-token shift never crosses a sequence boundary
        m = mask.bool()
        lengths = mask.sum(1)
        packed = dict(position_ids=torch.cat([torch.arange(int(n)) for n in lengths])[None],
                      seq_ids=torch.repeat_interleave(torch.arange(3), lengths), num_seqs=3)
        p_hf = fused(ids[m][None], labels=labels[m][None], **packed).logps
        p_none = fused(ids[m][None], labels=aligned[m][None], label_shift="none", **packed).logps
        torch.testing.assert_close(p_hf, hf, atol=1e-5, rtol=0)
        torch.testing.assert_close(p_none, hf, atol=1e-5, rtol=0)
        # a deliberate opt-out skips the check (and then the caller owns the convention)
        FusedCausalLM(model, check_labels=False)(ids, labels=aligned, attention_mask=mask)


def test_output_argument_is_deprecated_but_works(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=16)
    ids, labels, mask = batch(len(tok))
    fused = FusedCausalLM(model)
    with torch.no_grad():
        with pytest.warns(DeprecationWarning, match=r"\.naive_logps"):
            naive = fused(ids, labels=labels, attention_mask=mask, output="naive")
        with pytest.warns(DeprecationWarning, match=r"\.hidden"):
            h = fused(ids, labels=labels, attention_mask=mask, output="hidden")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain = fused(ids, labels=labels, attention_mask=mask, output="logps")
    torch.testing.assert_close(naive.logps, plain.logps, atol=1e-5, rtol=0)
    assert torch.equal(h.labels[:, :-1], labels[:, 1:])


def test_model_without_logits_to_keep_falls_back_with_a_warning(tok):
    from transformers import LlamaForCausalLM

    class OldStyle(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)

    model, _ = tiny_model("llama", tokenizer=tok, seed=17)
    odd = OldStyle(model.config)
    odd.load_state_dict(model.state_dict())
    ids, labels, mask = batch(len(tok))
    with pytest.warns(UserWarning, match="takes no logits_to_keep"):
        fused = FusedCausalLM(odd)
    assert not fused.through_model
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, labels=labels, attention_mask=mask).logps,
                                   FusedCausalLM(model)(ids, labels=labels, attention_mask=mask).logps,
                                   atol=1e-5, rtol=0)


def test_inputs_embeds_double_backward_matches_materialised_logits(tok):
    """WDPO's penalty differentiates d loss / d embeddings (double backward through the model and the
    fused op): parameter gradients equal the same computation from the model's own logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastpref.losses import PreferenceObjective

    model, _ = tiny_model("llama", tokenizer=tok, seed=18, hidden_size=32, tie_word_embeddings=False)
    ids, labels, mask = batch(len(tok), lengths=(9, 7, 11, 8), prompts=(2, 3, 4, 2), seed=19)
    ref = torch.tensor([-40.0, -35.0, -42.0, -30.0])
    objective = PreferenceObjective("wdpo", beta=0.5, rho=0.7)

    def run(m, fused):
        embeds = m.get_input_embeddings()(ids)
        with sdpa_kernel([SDPBackend.MATH]):  # the fused SDPA kernels have no double backward
            if fused:
                out = FusedCausalLM(m)(ids, labels=labels, attention_mask=mask, inputs_embeds=embeds)
                logps, counts = out.logps, out.counts
            else:
                logits = m(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
                target = labels[:, 1:]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
                logps, counts = (lp * (target != IGNORE_INDEX)).sum(1), (target != IGNORE_INDEX).sum(1)
            loss = objective(logps, counts=counts, ref_logps=ref, inputs_embeds=embeds).loss
        loss.backward()
        return loss.detach(), grads_of(m)

    naive_loss, naive_grads = run(copy.deepcopy(model), fused=False)
    fused_loss, fused_grads = run(model, fused=True)
    torch.testing.assert_close(fused_loss, naive_loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(fused_grads, naive_grads, atol=1e-5, rtol=1e-4)
