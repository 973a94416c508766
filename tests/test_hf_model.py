"""The Hugging Face wrapper: fused sequence log-probs equal log-probs from the model's own logits
(fp32: max abs error <= 1e-4 per sequence sum) on SmolLM2-135M and on tiny random Llama, Qwen2, GPT-2
and GPT-NeoX (tied and untied embeddings; no, right and left padding; packed), gradients, gradient
checkpointing, bf16, PEFT LoRA references and heads that post-process logits."""
import copy

import pytest
import torch

from fastpref.hf import FusedCausalLM, PreferenceCollator, UnsupportedModelError, head_temperature, load_preferences
from fastpref.hf.model import IGNORE_INDEX, model_inputs
from fastpref.models import TINY_ARCHITECTURES, tiny_config, tiny_model, tiny_tokenizer
from fastpref.train import enable_checkpointing

ATOL_FP32 = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(["the quick brown fox jumps over the lazy dog " * 4, "hello world"], vocab_size=320)


def model_logps(model, input_ids, labels, attention_mask=None, position_ids=None):
    """Ground truth: the model's own forward (full logits), fp32 log_softmax, HF shift, masked sum."""
    if attention_mask is not None and position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    tok_lp = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return torch.where(mask, tok_lp, torch.zeros_like(tok_lp)).sum(-1), mask.sum(-1)


def random_batch(vocab, lengths, prompt_lens, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 3, dtype=torch.long)  # 3 = <pad> in the tiny tokenizer
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        seq = torch.randint(4, vocab, (n,), generator=g)
        sl = slice(0, n) if padding != "left" else slice(T - n, T)
        ids[i, sl] = seq
        lab = seq.clone()
        lab[:p] = IGNORE_INDEX
        labels[i, sl] = lab
        mask[i, sl] = 1
    return ids, labels, (None if padding == "none" else mask)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_matches_model_logits(tok, arch, tie, padding):
    model, _ = tiny_model(arch, tokenizer=tok, tie_word_embeddings=tie, seed=1)
    out_emb, in_emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (out_emb is in_emb) == tie
    wrapper = FusedCausalLM(model).eval()
    lengths = [12, 12, 12] if padding == "none" else [12, 7, 10]
    ids, labels, mask = random_batch(len(tok), lengths, [4, 2, 9], padding)
    with torch.no_grad():
        out = wrapper(ids, labels=labels, attention_mask=mask)
        expected, counts = model_logps(model, ids, labels, mask)
    assert out.logps.dtype == torch.float32
    assert torch.equal(out.counts, counts)
    err = (out.logps.double() - expected).abs().max().item()
    assert err <= ATOL_FP32, f"{arch} tie={tie} padding={padding}: max |err| {err:.3g}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_equals_unpadded_and_packed(tok, arch):
    model, _ = tiny_model(arch, tokenizer=tok, seed=2)
    wrapper = FusedCausalLM(model).eval()
    lengths, prompts = [9, 5, 13], [3, 1, 6]
    ids, labels, mask = random_batch(len(tok), lengths, prompts, "left", seed=5)
    with torch.no_grad():
        padded = wrapper(ids, labels=labels, attention_mask=mask).logps
        singles = torch.cat([wrapper(ids[i:i + 1, -n:], labels=labels[i:i + 1, -n:]).logps for i, n in enumerate(lengths)])
        m = mask.bool()
        packed = wrapper(ids[m][None], labels=labels[m][None],
                         position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                         seq_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)), num_seqs=3)
        naive_packed = wrapper.naive_logps(
            ids[m][None], labels=labels[m][None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            seq_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)), num_seqs=3)
    torch.testing.assert_close(padded, singles, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(packed.logps, singles, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(naive_packed.logps, singles, atol=ATOL_FP32, rtol=0)
    assert packed.counts.tolist() == [n - p for n, p in zip(lengths, prompts)]


def test_collated_packed_batch_equals_padded(tok):
    model, _ = tiny_model("qwen2", tokenizer=tok, seed=3)
    wrapper = FusedCausalLM(model).eval()
    rows = [{"prompt": "the quick", "chosen": " brown fox", "rejected": " lazy dog jumps"},
            {"prompt": "hello world the lazy dog", "chosen": " jumps", "rejected": " over the fox"}]
    data = load_preferences(rows, tok)
    with torch.no_grad():
        pad = wrapper.logps(PreferenceCollator(tok.pad_token_id)(data.examples))
        pk = wrapper.logps(PreferenceCollator(tok.pad_token_id, packed=True)(data.examples))
    assert torch.equal(pad.counts, pk.counts)
    torch.testing.assert_close(pk.logps, pad.logps, atol=ATOL_FP32, rtol=0)


def test_gradients_match_naive_and_gradient_checkpointing(tok):
    torch.manual_seed(0)
    model, _ = tiny_model("llama", tokenizer=tok, seed=4, tie_word_embeddings=False)
    ids, labels, mask = random_batch(len(tok), [10, 7, 12], [3, 2, 5], "right", seed=7)
    g = torch.randn(3, dtype=torch.float64)

    def grads(naive, checkpointing=False):
        m = copy.deepcopy(model)
        if checkpointing:
            enable_checkpointing(m)
            assert any(getattr(layer, "gradient_checkpointing", False) for layer in m.modules())
        m.train()
        w = FusedCausalLM(m)
        call = w.naive_logps if naive else w
        (call(ids, labels=labels, attention_mask=mask).logps.double() * g).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    fused, naive, ckpt = grads(False), grads(True), grads(False, checkpointing=True)
    assert set(fused) == set(naive)
    for name in fused:
        torch.testing.assert_close(fused[name], naive[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ckpt[name], fused[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_hidden_output_feeds_the_op(tok):
    from fastpref import sequence_logps

    model, _ = tiny_model("gpt_neox", tokenizer=tok, seed=5)
    wrapper = FusedCausalLM(model).eval()
    ids, labels, mask = random_batch(len(tok), [8, 6], [2, 2], "right")
    with torch.inference_mode():
        h = wrapper.hidden(ids, labels=labels, attention_mask=mask)
        assert h.hidden.shape == (2, 8, model.config.hidden_size) and h.labels.shape == (2, 8)
        assert (h.labels[:, -1] == IGNORE_INDEX).all()
        direct = sequence_logps(h.hidden, h.weight, h.labels, bias=h.bias)
        assert torch.equal(direct.logps, wrapper(ids, labels=labels, attention_mask=mask).logps)


def test_bf16_close_to_fp32(tok):
    model, _ = tiny_model("llama", tokenizer=tok, seed=6)
    ids, labels, mask = random_batch(len(tok), [10, 8], [3, 3], "right")
    with torch.no_grad():
        truth, _ = model_logps(model, ids, labels, mask)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        fused = FusedCausalLM(model_bf16)(ids, labels=labels, attention_mask=mask).logps
        naive = FusedCausalLM(model_bf16).naive_logps(ids, labels=labels, attention_mask=mask).logps
    assert fused.dtype == torch.float32
    # error budget: at most twice the naive bf16 path's own error, plus a small margin
    budget = 2 * (naive.double() - truth).abs().max().item() + 0.05
    assert (fused.double() - truth).abs().max().item() <= budget


# -- heads ---------------------------------------------------------------------------------------


def test_softcapped_head_is_refused(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping=30.0"):
        FusedCausalLM(model)


def test_granite_logits_scaling_becomes_temperature(tok):
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0)
    torch.manual_seed(0)
    model = GraniteForCausalLM(cfg).eval()
    assert head_temperature(cfg) == 4.0
    ids, labels, mask = random_batch(len(tok), [9, 6], [2, 2], "right")
    with torch.no_grad():
        out = FusedCausalLM(model)(ids, labels=labels, attention_mask=mask).logps
        expected, _ = model_logps(model, ids, labels, mask)
    assert (out.double() - expected).abs().max().item() <= ATOL_FP32


def test_unknown_multiplier_is_refused():
    cfg = tiny_config("llama", vocab_size=64)
    cfg.lm_head_multiplier = 0.5
    with pytest.raises(UnsupportedModelError, match="lm_head_multiplier=0.5"):
        head_temperature(cfg)


def test_verify_catches_what_the_config_does_not_say(tok):
    from transformers import LlamaForCausalLM

    class ScaledHead(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model, _ = tiny_model("llama", tokenizer=tok)
    odd = ScaledHead(model.config)
    odd.load_state_dict(model.state_dict())
    assert FusedCausalLM(model).verify() <= 1e-4
    with pytest.raises(UnsupportedModelError, match="differ from the model's own logits"):
        FusedCausalLM(odd).verify()


# -- PEFT ----------------------------------------------------------------------------------------


def test_lora_adapters_disabled_equals_base_model(tok):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_model("llama", tokenizer=tok, seed=8)
    ids, labels, mask = random_batch(len(tok), [11, 7], [3, 2], "right", seed=9)
    with torch.no_grad():
        expected = FusedCausalLM(copy.deepcopy(base)).eval()(ids, labels=labels, attention_mask=mask).logps
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    wrapper = FusedCausalLM(peft_model).eval()
    with torch.no_grad():
        adapted = wrapper(ids, labels=labels, attention_mask=mask).logps
        with wrapper.adapters_disabled():
            reference = wrapper(ids, labels=labels, attention_mask=mask).logps
        again = wrapper(ids, labels=labels, attention_mask=mask).logps
    assert (adapted - expected).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(reference, expected, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)
    # gradients reach the adapters only
    wrapper.train()
    wrapper(ids, labels=labels, attention_mask=mask).logps.sum().backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_lora_on_the_output_head_is_refused(tok):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_model("llama", tokenizer=tok, tie_word_embeddings=False)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedModelError, match="PEFT adapter layer on the output head"):
        ids, labels, mask = random_batch(len(tok), [5], [1], "right")
        FusedCausalLM(peft_model)(ids, labels=labels, attention_mask=mask)


# -- the real model ------------------------------------------------------------------------------


def test_smollm2_matches_its_own_logits(smollm2):
    from fastpref.train import demo_data_path

    model, tok = smollm2
    model.eval()
    data = load_preferences(demo_data_path(), tok)
    batch = PreferenceCollator(tok.pad_token_id)(data.examples[:3])  # 6 sequences, right padded
    wrapper = FusedCausalLM(model)
    assert wrapper.backbone is model.model
    with torch.no_grad():
        out = wrapper.logps(batch)
        inputs = model_inputs(batch)
        expected, counts = model_logps(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
    assert torch.equal(out.counts, counts)
    err = (out.logps.double() - expected).abs().max().item()
    assert err <= ATOL_FP32, f"max |err| {err:.3g} over sums of {counts.tolist()} tokens"
    # the tokenizer's chat template marks the assistant turn; its end token (eos) is scored once, then
    # the newline the template renders after it (TRL's tokenization)
    ex = data[0]
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert ex["chosen_ids"][-2] == tok.eos_token_id and ex["chosen_ids"].count(tok.eos_token_id) == 1
    assert tok.decode(ex["chosen_ids"][-1:]) == "\n"


def test_hidden_output_composes_with_the_fused_loss(tok):
    from fastpref.losses import FusedPreferenceLoss, dpo_loss

    model, _ = tiny_model("qwen2", tokenizer=tok, seed=11, tie_word_embeddings=False)
    policy = FusedCausalLM(model)
    rows = [{"prompt": "the quick", "chosen": " brown fox", "rejected": " lazy dog jumps"},
            {"prompt": "hello world the lazy dog", "chosen": " jumps", "rejected": " over the fox"}]
    batch = PreferenceCollator(tok.pad_token_id)(load_preferences(rows, tok).examples)
    ref = torch.tensor([-30.0, -20.0, -25.0, -28.0])
    h = policy.hidden(**model_inputs(batch))
    fused = FusedPreferenceLoss("sigmoid", beta=0.1, temperature=policy.temperature)(
        h.hidden, h.weight, h.labels, bias=h.bias, ref_logps=ref, **h.packing)
    logps = policy.logps(batch, output="naive").logps
    naive = dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
    torch.testing.assert_close(fused.loss, naive.loss, atol=1e-6, rtol=1e-5)
    fused.loss.backward()
    assert model.get_output_embeddings().weight.grad is not None
