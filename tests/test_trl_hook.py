"""fastpref.integrations.trl: FusedDPOTrainer gives TRL 1.16's DPOTrainer numbers.

Each case trains the same tiny Llama twice -- with ``trl.DPOTrainer`` and with ``FusedDPOTrainer`` --
on the same data, seed and config for a few optimizer steps, and compares the logged loss, rewards and
log-probs (TRL's metric names) at every step and every parameter at the end: within 1e-5 in fp32;
under ``bf16=True`` (TRL's default, with gradient checkpointing) within twice what bf16 itself changes
in TRL's own run (the STYLE.md error budget) plus a small margin. Standard and conversational data,
PEFT (reference = adapters disabled), precomputed reference columns, LD-DPO, a mix of loss types, and
fastpref's own objectives as loss types."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="the TRL extra is not installed (pip install 'fastpref[trl]')")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastpref.integrations.trl import (  # noqa: E402
    FASTPREF_LOSS_TYPES,
    TRL_LOSS_TYPES,
    FusedDPOTrainer,
    objective_from_config,
    supported_loss_types,
)
from fastpref.losses import PreferenceObjective  # noqa: E402
from fastpref.models import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
STEPS = 3

WORDS = "the quick brown fox jumps over a lazy dog while hello world says good morning to everyone".split()


def _sentence(i, n):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


STANDARD = [{"prompt": _sentence(i, 3 + i % 4), "chosen": " " + _sentence(i + 1, 2 + i % 3),
             "rejected": " " + _sentence(i + 5, 1 + (i * 2) % 5)} for i in range(8)]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": _sentence(i, 3 + i % 3)}],
                   "chosen": [{"role": "assistant", "content": _sentence(i + 2, 2 + i % 4)}],
                   "rejected": [{"role": "assistant", "content": _sentence(i + 4, 1 + i % 3)}]} for i in range(8)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer([_sentence(i, 12) for i in range(20)], vocab_size=300)


@pytest.fixture(scope="module")
def base_model(tok):
    return tiny_model("llama", tokenizer=tok, seed=0, hidden_size=32, num_layers=2, tie_word_embeddings=False)[0]


def _config(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=STEPS,
              per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, save_strategy="no", bf16=False,
              gradient_checkpointing=False, seed=0, max_length=64, disable_tqdm=True)
    kw.update(overrides)
    return DPOConfig(**kw)


def _train(cls, tmp_path, tok, model, records, *, ref=True, fingerprint=None, trainer_kwargs=None, **config):
    """``(log_history rows with metrics, trained model, trainer)`` of ``cls`` on a fresh copy of ``model``."""
    model = copy.deepcopy(model)
    ds = Dataset.from_list(records)
    if fingerprint is not None:  # a distinct cache key for TRL's precomputed reference columns
        ds = ds.map(lambda r: r, new_fingerprint=fingerprint)
    kwargs = dict(trainer_kwargs or {})
    if ref:
        kwargs["ref_model"] = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, args=_config(tmp_path / cls.__name__, **config), train_dataset=ds,
                      processing_class=tok, **kwargs)
        trainer.start_params = _params(trainer.model)
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    assert len(rows) == config.get("max_steps", STEPS)
    return rows, trainer.model, trainer


def _params(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _compare(trl_run, fused_run, *, atol=1e-5, logps_rtol=1e-6, param_atol=1e-5, update_rtol=1e-4):
    """Logged metrics within ``atol``; every parameter's training update within ``update_rtol`` of TRL's
    (norm) and each element within ``param_atol`` or 1 % of the largest update element (Adam divides by
    the gradient's own scale, so an element whose gradient nearly cancels amplifies fp32 round-off)."""
    (trl_rows, trl_model, trl_trainer), (fp_rows, fp_model, _) = trl_run, fused_run
    for step, (a, b) in enumerate(zip(trl_rows, fp_rows)):
        for key in METRICS:
            assert key in b, f"step {step}: FusedDPOTrainer did not log {key!r}"
            if key == "rewards/accuracies" and abs(a["rewards/margins"]) < 1e-4:
                continue  # policy == reference: the sign of each ~1e-7 margin is rounding noise
            tol = atol + (logps_rtol * abs(a[key]) if key.startswith("logps/") else 0.0)
            assert abs(a[key] - b[key]) <= tol, f"step {step} {key}: TRL {a[key]!r} vs fastpref {b[key]!r} (tol {tol:.2g})"
    pa, pb, p0 = _params(trl_model), _params(fp_model), trl_trainer.start_params
    assert set(pa) == set(pb)
    moved = 0
    for name in pa:
        update = pa[name] - p0[name]
        diff = pa[name] - pb[name]
        moved += update.abs().max().item() > 0
        assert diff.norm().item() <= update_rtol * update.norm().item() + 1e-7, (
            f"{name}: |update difference| {diff.norm():.3g} vs |TRL's update| {update.norm():.3g}")
        err = diff.abs().max().item()
        assert err <= max(param_atol, 1e-2 * update.abs().max().item()), \
            f"{name}: |TRL - fastpref| = {err:.3g} after training (largest update {update.abs().max():.3g})"
    assert moved, "no parameter moved: the comparison cannot fail"


# -- fp32: equal to TRL ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["aot_unpaired"], ["sigmoid", "sft"]], ids="+".join)
def test_fp32_standard_equals_trl(tmp_path, tok, base_model, loss_type):
    # ipo: length-normalised; aot_unpaired: batch-sorted (and renamed since TRL v0.24); a weighted mix
    extra = {"loss_weights": [1.0, 0.5]} if len(loss_type) > 1 else {}
    if loss_type != ["sigmoid"]:
        extra["max_steps"] = 2
    trl_run = _train(DPOTrainer, tmp_path, tok, base_model, STANDARD, loss_type=loss_type, **extra)
    fused_run = _train(FusedDPOTrainer, tmp_path, tok, base_model, STANDARD, loss_type=loss_type, **extra)
    _compare(trl_run, fused_run)


def test_fp32_conversational_and_ld_alpha_equal_trl(tmp_path, tok, base_model):
    trl_run = _train(DPOTrainer, tmp_path, tok, base_model, CONVERSATIONAL, ld_alpha=0.5)
    fused_run = _train(FusedDPOTrainer, tmp_path, tok, base_model, CONVERSATIONAL, ld_alpha=0.5)
    _compare(trl_run, fused_run)


def test_fp32_peft_reference_is_the_base_model(tmp_path, tok, base_model):
    from peft import LoraConfig

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    runs = [_train(cls, tmp_path, tok, base_model, STANDARD, ref=False,
                   trainer_kwargs={"peft_config": LoraConfig(**lora)}, learning_rate=2e-2)
            for cls in (DPOTrainer, FusedDPOTrainer)]
    _compare(*runs)
    assert runs[1][0][-1]["rewards/margins"] != 0.0  # the adapters moved away from the reference


def test_fp32_precomputed_reference(tmp_path, tok, base_model):
    runs = [_train(cls, tmp_path, tok, base_model, STANDARD, ref=False, fingerprint=f"precompute-{cls.__name__}",
                   precompute_ref_log_probs=True) for cls in (DPOTrainer, FusedDPOTrainer)]
    cols = [(r[2].train_dataset["ref_chosen_logps"], r[2].train_dataset["ref_rejected_logps"]) for r in runs]
    for trl_col, fp_col in zip(*cols):
        torch.testing.assert_close(torch.tensor(fp_col), torch.tensor(trl_col), atol=1e-5, rtol=1e-6)
    _compare(*runs)


@pytest.mark.parametrize("records", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_fp32_prefix_shared_packed_step_equals_trl(tmp_path, tok, base_model, records):
    """share_prompt=True: each pair is one packed segment [prompt | chosen | rejected] (fastpref.step)."""
    # SGD: the other attention layout changes rounding only; Adam would turn that into +-lr steps on
    # parameters whose gradient is ~0, SGD keeps parameter differences proportional to gradient ones.
    sgd = dict(optim="sgd", learning_rate=0.5)
    trl_run = _train(DPOTrainer, tmp_path, tok, base_model, records, **sgd)
    fused_run = _train(FusedDPOTrainer, tmp_path, tok, base_model, records, trainer_kwargs={"share_prompt": True},
                       **sgd)
    trainer = fused_run[2]
    # policy and reference batches of every step went through the shared layout
    assert trainer.shared_batches == 2 * STEPS
    assert {step.layout for step in trainer._fp_steps.values()} == {"shared"}
    _compare(trl_run, fused_run)


# -- bf16 (TRL's defaults: bf16=True, gradient checkpointing) --------------------------------------


def test_bf16_default_config_within_budget(tmp_path, tok, base_model):
    # Plain SGD: a parameter's change is proportional to its gradient, so bf16 gradient noise is not
    # amplified into +-lr sign flips as Adam does for near-zero gradients.
    sgd = dict(optim="sgd", learning_rate=0.5)
    fp32 = _train(DPOTrainer, tmp_path, tok, base_model, STANDARD, **sgd)
    bf16 = dict(bf16=True, gradient_checkpointing=True, **sgd)
    trl_bf16 = _train(DPOTrainer, tmp_path, tok, base_model, STANDARD, **bf16)
    fused_bf16 = _train(FusedDPOTrainer, tmp_path, tok, base_model, STANDARD, **bf16)
    # the first step sees identical weights: the forward under autocast must match TRL's closely
    for key in METRICS:
        a, b, truth = trl_bf16[0][0][key], fused_bf16[0][0][key], fp32[0][0][key]
        budget = 2 * abs(a - truth) + 1e-4 + (1e-5 * abs(truth) if key.startswith("logps/") else 0.0)
        assert abs(b - truth) <= budget, f"step 0 {key}: fastpref {b} vs fp32 {truth} (TRL bf16 {a}, budget {budget:.3g})"
    # ... and follow TRL's autocast: same weights, same bf16 backbone -> far closer to TRL's bf16 run than bf16
    # is to fp32 (ignoring the autocast, as fastpref once did, lands near the fp32 values instead)
    for key in ("logps/chosen", "logps/rejected"):
        a, b, truth = trl_bf16[0][0][key], fused_bf16[0][0][key], fp32[0][0][key]
        assert abs(b - a) <= 0.1 * abs(a - truth), f"step 0 {key}: fastpref {b}, TRL bf16 {a}, fp32 {truth}"
    # later steps: both bf16 runs stay within twice TRL's own bf16 drift (plus a margin) of the fp32 run
    for step in range(1, STEPS):
        for key in METRICS:
            a, b, truth = trl_bf16[0][step][key], fused_bf16[0][step][key], fp32[0][step][key]
            budget = 2 * abs(a - truth) + 2e-3 * max(1.0, abs(truth))
            assert abs(b - truth) <= budget, f"step {step} {key}: fastpref {b} vs fp32 {truth} (TRL bf16 {a})"
    p32, ptrl, pfp = _params(fp32[1]), _params(trl_bf16[1]), _params(fused_bf16[1])
    for name in p32:
        drift = (ptrl[name] - p32[name]).abs().max().item()
        err = (pfp[name] - p32[name]).abs().max().item()
        assert err <= 2 * drift + 1e-4, f"{name}: fastpref bf16 off fp32 by {err:.3g}, TRL bf16 by {drift:.3g}"


# -- fastpref objectives as loss types -------------------------------------------------------------


@pytest.mark.parametrize("loss_type,options", [("kldpo", {}), ("drdpo", {}), ("ulma", {}), ("simpo", {})])
def test_fastpref_objectives_as_loss_types(tmp_path, tok, base_model, loss_type, options):
    """One full-batch step: the logged loss is the objective on the fused log-probs of that batch."""
    rows, _, trainer = _train(FusedDPOTrainer, tmp_path, tok, base_model, STANDARD, loss_type=[loss_type],
                              trainer_kwargs={"loss_options": options}, per_device_train_batch_size=8,
                              learning_rate=0.0, max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    policy = trainer.fused(trainer.model)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = policy(batch["input_ids"], labels=labels, attention_mask=batch["attention_mask"])
        ref = trainer.fused(trainer.ref_model)(batch["input_ids"], labels=labels,
                                                attention_mask=batch["attention_mask"]).logps
    obj = PreferenceObjective(loss_type, beta=0.1, **options)
    kw = {"sample_labels": torch.tensor([1.0] * 8 + [0.0] * 8)} if obj.layout == "pointwise" else {}
    expected = obj(out.logps, counts=out.counts, ref_logps=ref if obj.needs_reference else None, **kw)
    for row in rows:  # lr 0: every step sees the same weights and the same (whole) batch
        assert row["loss"] == pytest.approx(float(expected.loss), abs=1e-5)
        assert set(METRICS) <= set(row)


def test_wdpo_loss_type_differentiates_the_embedding_penalty(tmp_path, tok, base_model):
    """WDPO (double backward through the model and the fused op): the logged loss equals the objective
    on log-probs from the model's own logits, computed from the same input embeddings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = {"rho": 0.5}
    rows, _, trainer = _train(FusedDPOTrainer, tmp_path, tok, base_model, STANDARD, loss_type=["wdpo"],
                              trainer_kwargs={"loss_options": options}, per_device_train_batch_size=8,
                              learning_rate=0.0, max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model = copy.deepcopy(base_model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]

    def naive_logps(m, embeds):
        with sdpa_kernel([SDPBackend.MATH]):
            logits = m(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
        tok_lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return (tok_lp * (labels != -100)).sum(1)

    embeds = model.get_input_embeddings()(ids)
    logps = naive_logps(model, embeds)
    with torch.no_grad():
        ref = naive_logps(copy.deepcopy(base_model), embeds.detach())
    obj = PreferenceObjective("wdpo", beta=0.1, **options)
    expected = obj(logps, counts=(labels != -100).sum(1), ref_logps=ref, inputs_embeds=embeds)
    assert float(expected.details.penalty.abs().max()) > 0  # the penalty is non-trivial
    assert rows[0]["loss"] == pytest.approx(float(expected.loss), abs=1e-5)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,match", [
    ({"loss_type": ["nonsense"]}, "not supported by FusedDPOTrainer.*supported: sigmoid"),
    ({"loss_type": ["bco_pair"]}, "running reward mean"),
    ({"loss_type": ["wdpo"], "ld_alpha": 0.5}, "ld_alpha with loss_type 'wdpo'"),
    ({"loss_type": ["wdpo"], "gradient_checkpointing": True}, "gradient_checkpointing"),
    ({"use_weighting": True}, "use_weighting"),
    ({"loss_type": ["sigmoid", "ipo"]}, "'ipo' in a mix"),
    ({"loss_type": ["kldpo", "sigmoid"]}, "cannot be mixed"),
])
def test_unsupported_settings_are_refused_up_front(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        objective_from_config(_config(tmp_path, **settings))


def test_supported_loss_types_cover_trl_where_semantics_agree():
    names = supported_loss_types()
    assert {"sigmoid", "hinge", "ipo", "robust", "sft", "aot", "kldpo", "ulma"} <= set(names)
    assert set(names) - set(FASTPREF_LOSS_TYPES) <= set(TRL_LOSS_TYPES)
