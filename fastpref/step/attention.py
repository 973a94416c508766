"""Can a model take a prepared prefix-sharing mask? Static checks on its config, then a numeric probe.

transformers 5.x (``masking_utils``) returns a 4D ``attention_mask`` (a tensor, or a flex-attention
``BlockMask``) given to the model *as is*: every layer then uses it instead of the mask it would build.
That is exact for a model whose attention is ``softmax(q k^T * scale + mask) v`` with positions from
``position_ids`` (rotary or learned absolute), through ``sdpa`` or ``eager`` (both take an additive float
mask: 0 / dtype min) or ``flex_attention`` (a ``BlockMask`` built from the per-token segment and block
ids: O(R * L) to describe, and the kernel skips fully masked tiles). It is silently wrong for a model
whose layers build something else from the mask: sliding-window or chunked layers (the window would be
dropped), ALiBi position biases built from a 2D mask, attention soft-capping (refused to be safe), or an
unknown attention function.

Flash attention (``flash_attention_2``/``_3``) takes no mask at all, only packed sequences told apart by
position ids that restart at 0 (varlen): it runs the ``unshared`` packed layout (padding-free, the prompt
repeated per answer) with no mask, see :func:`packed_layout_support`.

:func:`prefix_mask_support` answers ``(ok, reason)`` from the config; :func:`probe_prefix_mask` runs the
model once on a short random group, shared vs unshared, and compares the log-probs (catches what the config
does not reveal); :func:`mask_for_attention` is what the model is given. The ``sdpa``, ``eager`` and
``flex_attention`` paths are tested on the CPU; none has been measured or tested on a GPU here. On the
CPU, torch 2.13's flex attention has no backward and its compiled kernel fails to build once a second
batch shape makes it dynamic: there, use ``sdpa`` (the default) for training.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
# Kernels that take packed sequences only through position ids (varlen), with no mask.
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
# Model types whose attention bias comes from the 2D mask / absolute key offsets, not position ids.
_ALIBI_MODEL_TYPES = ("bloom", "mpt", "falcon", "baichuan", "jais")


def _text_config(config):
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    return text if text is not None else config


def attn_implementation(config) -> str:
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, dict):  # per sub-config; the text model's is the one that matters
        impl = impl.get("text_config", impl.get("", None))
    return str(impl or "eager")


def prefix_mask_support(model) -> Tuple[bool, str]:
    """``(ok, reason)``: whether ``model`` (a causal LM, or a :class:`~fastpref.hf.FusedCausalLM`) computes
    exactly the same thing with a prepared 4D mask and explicit position ids. ``reason`` is one line."""
    lm = getattr(model, "causal_lm", model)
    impl = attn_implementation(lm.config)
    if impl not in MASK_IMPLEMENTATIONS:
        return False, (f"attn_implementation={impl!r} takes no prepared 4D mask (only "
                       f"{' / '.join(MASK_IMPLEMENTATIONS)} do)")
    refusal = _refusal(model)
    if refusal:
        return False, refusal
    return True, f"{_model_type(model)} with {impl} attention takes the prefix-sharing mask"


def packed_layout_support(model) -> Tuple[bool, str]:
    """``(ok, reason)``: whether a varlen (flash) model computes exactly the same thing on the ``unshared``
    packed layout given only its position ids (no mask): each sequence restarts at position 0."""
    lm = getattr(model, "causal_lm", model)
    impl = attn_implementation(lm.config)
    if impl not in VARLEN_IMPLEMENTATIONS:
        return False, f"attn_implementation={impl!r} is not a varlen kernel"
    refusal = _refusal(model)
    if refusal:
        return False, refusal
    return True, (f"{_model_type(model)} with {impl}: packed sequences by position ids, no prefix sharing "
                  "(a varlen kernel takes no mask)")


def _model_type(model) -> str:
    return str(getattr(_text_config(getattr(model, "causal_lm", model).config), "model_type", "") or "")


def _refusal(model) -> Optional[str]:
    """Why packed sequences with explicit position ids might not equal separate ones (None: they do)."""
    policy = model
    lm = getattr(model, "causal_lm", model)
    cfg = _text_config(lm.config)
    model_type = _model_type(model)
    accepts_positions = getattr(policy, "_accepts_position_ids", None)
    if accepts_positions is False:
        return f"{type(lm).__name__}: its backbone takes no position_ids"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        other = sorted({str(t) for t in layer_types if t != "full_attention"})
        if other:
            return f"{model_type}: layer types {other} (only full-attention layers take the mask as is)"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) is not False:
        return f"{model_type}: sliding_window={window} would be dropped by a prepared mask"
    for name in ("attention_chunk_size", "attn_logit_softcapping", "attention_logit_softcapping"):
        value = getattr(cfg, name, None)
        if value is not None and value is not False:
            return f"{model_type}: {name}={value} (not verified with a prepared mask)"
    if getattr(cfg, "alibi", False) or model_type in _ALIBI_MODEL_TYPES:
        return f"{model_type}: ALiBi-style position bias is built from the 2D mask"
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "is_causal", True) is False:
        return f"{model_type}: not a plain causal decoder"
    return None


def mask_for_attention(packed, config, dtype: torch.dtype):
    """What the model gets as ``attention_mask`` for a packed batch: the additive ``[R, 1, L, L]`` mask
    (``sdpa``/``eager``, see :func:`mask_for_model`), a flex-attention ``BlockMask``
    (``flex_attention``), None for a varlen kernel on the ``unshared`` layout (position ids say where
    sequences start), or the 2D padding mask of the ``padded`` layout."""
    if packed.layout == "padded":
        return packed.attention_mask
    impl = attn_implementation(config)
    if impl in VARLEN_IMPLEMENTATIONS:
        if packed.layout != "unshared":
            raise ValueError(f"attn_implementation={impl!r} takes packed sequences without a mask: the "
                             f"{packed.layout!r} layout needs one (use the 'unshared' or 'padded' layout)")
        return None
    if impl == "flex_attention":
        return flex_block_mask(packed)
    return mask_for_model(packed.attention_mask, config, dtype)


def flex_block_mask(packed):
    """A flex-attention ``BlockMask`` equal to ``packed.attention_mask``, built from the per-token segment
    and block ids (``mask_mod`` reads two ``[R, L]`` tensors; the dense mask is never given to the model)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, blk = packed.segment_ids, packed.block_ids
    if seg is None or blk is None:
        raise ValueError(f"packed: the {packed.layout!r} layout carries no segment/block ids for a block mask")
    R, L = seg.shape

    def may_attend(b, h, q, kv):
        visible = (blk[b, kv] == 0) | (blk[b, kv] == blk[b, q])
        return (seg[b, q] == seg[b, kv]) & visible & (kv <= q)

    return create_block_mask(may_attend, B=R, H=None, Q_LEN=L, KV_LEN=L, device=seg.device)


def mask_for_model(mask: Tensor, config, dtype: torch.dtype) -> Tensor:
    """The boolean ``[R, 1, L, L]`` "may attend" mask as the additive mask both ``sdpa`` and ``eager``
    take: 0 where allowed, ``finfo(dtype).min`` elsewhere (no row is fully masked, so no NaN).

    ``dtype`` should be the attention's compute dtype (bf16 under bf16 autocast): ``sdpa`` converts a
    boolean mask or one of another dtype to the query's dtype in *every* layer and saves that copy for the
    backward (``R * L * L`` elements per layer); a mask already in that dtype is saved as is, one storage
    shared by all layers. ``eager`` adds it to the scores."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


@torch.no_grad()
def probe_prefix_mask(policy, *, seed: int = 0, tol: Optional[float] = None,
                      layout: str = "shared") -> Tuple[bool, str]:
    """Score two short random groups (2 answers each, packed in one row; ``layout`` ``"shared"``: one
    prompt per group, ``"unshared"``: one sequence per answer) and the same sequences one by one without
    any mask; ``(ok, reason)``: ok when the log-prob sums agree within ``tol`` (default
    ``1e-4 * (1 + |sum|)`` in fp32/fp64, ``5e-2 * (1 + |sum|)`` otherwise)."""
    from fastpref.step.packing import Group, pack_groups

    weight, _ = policy.head()
    V = weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(0, V, (n,), generator=gen).tolist()  # noqa: E731
    groups = [Group(r(5), [r(3), r(4)]), Group(r(3), [r(2), r(5)])]
    if layout not in ("shared", "unshared"):
        raise ValueError(f"layout: expected 'shared' or 'unshared', got {layout!r}")
    packed = pack_groups(groups, share_prompt=layout == "shared", max_tokens_per_row=None).to(weight.device)
    was = policy.training
    policy.eval()
    try:
        dtype = policy.causal_lm.get_input_embeddings().weight.dtype
        mask = mask_for_attention(packed, policy.config, dtype)
        hidden = policy.hidden_states(packed.input_ids, mask, packed.position_ids)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.rows)
        tok_shared = _token_logps(policy, h, packed.labels)
        shared = torch.zeros(packed.num_seqs, dtype=torch.float64, device=h.device).index_add(
            0, packed.seq_ids, tok_shared)
        alone = []
        for k in range(2):
            for g in groups:
                ids = torch.tensor([list(g.prompt) + list(g.answers[k])], device=weight.device)
                hid = policy.hidden_states(ids)[0]
                P = len(g.prompt)
                lab = ids[0, P:]
                alone.append(_token_logps(policy, hid[P - 1:-1], lab).sum())
        alone = torch.stack(alone)
    finally:
        policy.train(was)
    err = float((shared - alone).abs().max())
    scale = 1.0 + float(alone.abs().max())
    if tol is None:
        tol = (1e-4 if weight.dtype in (torch.float32, torch.float64) else 5e-2) * scale
    if not err <= tol:
        return False, (f"probe: {layout} packed log-probs differ from separate sequences by {err:.3g} "
                       f"(> {tol:.3g}); the model does not take the packed layout as is")
    return True, f"probe: {layout} packed log-probs match separate sequences (max |diff| {err:.2e})"


def _token_logps(policy, h: Tensor, labels: Tensor) -> Tensor:
    weight, bias = policy.head()
    logits = h.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / policy.temperature, -1)
    return logp.gather(-1, labels[:, None])[:, 0]
