"""TRL 1.16 parity of the data path: conversational records tokenise token for token as TRL's own
``DPOTrainer`` prepares them (SmolLM2-135M-Instruct's chat template, from the GGUF the package ships),
and every DPO loss name TRL 1.16 accepts is either served by ``FusedDPOTrainer`` or refused by name.

Plain-text records are deliberately not TRL-identical: TRL tokenises ``prompt + response`` as one string
and cuts at the common token prefix, so a merge across the boundary (``"Hello" + "world"``) moves prompt
tokens into the response (or drops the whole prompt); fastpref tokenises them apart and keeps the prompt.
"""
import types
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="the TRL extra is not installed (pip install 'fastpref[trl]')")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastpref.hf import load_preferences  # noqa: E402
from fastpref.integrations.trl import TRL_LOSS_TYPES, objective_from_config, supported_loss_types  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from fastpref.models import ModelNotFoundError, _cache_entry, find_smollm2, is_cached

    try:
        loc = find_smollm2()
    except ModelNotFoundError as exc:  # a missing model is a failure, not a skip
        pytest.fail(str(exc))
    if is_cached(loc, "float32"):  # the converted copy: a second instead of ~12 s of GGUF conversion
        return AutoTokenizer.from_pretrained(str(_cache_entry(loc, torch.float32)), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(loc.directory), gguf_file=loc.filename)


def _m(role, content):
    return {"role": role, "content": content}


SYSTEMS = [None, "You are terse.", "Answer in French.\n", "  spaced system  "]
USERS = ["What is 2+2?", "Write a haiku about rain\n", "Ünïcödé ✓ 日本語 — ok?", "code:\n```py\nprint(1)\n```",
         "  leading and trailing  ", "multi\n\nparagraph\n\n"]
ANSWERS = ["4", "Leaves fall\nsoftly down\n", "  no  ", "Sure! Here it is:\n\n1. one\n2. two", "日本", "\nnewline first",
           "ends with eos<|im_end|>", "Paris."]


def _records():
    """48 conversational records (144 token sequences): system prompts or not, multi-turn prompts,
    whitespace and newlines at both ends of messages, unicode, markdown, implicit prompts."""
    out = []
    for i in range(48):
        prompt = [] if SYSTEMS[i % 4] is None else [_m("system", SYSTEMS[i % 4])]
        if i % 5 == 3:  # an earlier exchange in the prompt
            prompt += [_m("user", USERS[(i + 1) % 6]), _m("assistant", ANSWERS[(i + 2) % 8])]
        prompt.append(_m("user", USERS[i % 6]))
        chosen = [_m("assistant", ANSWERS[i % 8])]
        rejected = [_m("assistant", ANSWERS[(i * 3 + 1) % 8])]
        if i % 7 == 6:  # a response that continues the conversation
            chosen += [_m("user", "and?"), _m("assistant", "done")]
        if i % 4 == 1:  # implicit prompt: the shared leading messages
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _trl_tokenize(records, tokenizer):
    """TRL 1.16's own dataset preparation (DPOTrainer._prepare_dataset), no truncation (TRL truncates in
    the collator). Records without a ``prompt`` key go through TRL's prompt extraction, as a dataset of
    their own (TRL decides that per dataset)."""
    args = DPOConfig(output_dir="unused", report_to="none", use_cpu=True, max_length=None)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)  # all _prepare_dataset reads from self
    out = {}
    for implicit in (False, True):
        idx = [i for i, r in enumerate(records) if ("prompt" not in r) == implicit]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = DPOTrainer._prepare_dataset(trainer, Dataset.from_list([records[i] for i in idx]), tokenizer,
                                             args, "parity")
        out.update(zip(idx, ds))
    return [out[i] for i in range(len(records))]


def test_conversational_tokenization_equals_trl_token_for_token(smollm2_tokenizer):
    records = _records()
    trl = _trl_tokenize(records, smollm2_tokenizer)
    ours = load_preferences(records, smollm2_tokenizer, max_length=None, max_prompt_length=None).examples
    assert len(ours) == len(trl) == 48
    diffs = []
    for i, (t, f) in enumerate(zip(trl, ours)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(t[key]) != list(f[key]):
                diffs.append(f"record {i} {key}: TRL ...{smollm2_tokenizer.decode(t[key][-6:])!r} vs "
                             f"fastpref ...{smollm2_tokenizer.decode(f[key][-6:])!r}")
    assert not diffs, f"{len(diffs)}/144 sequences differ from TRL:\n" + "\n".join(diffs[:10])
    # the cases that used to differ: the newline after the end-of-turn token belongs to the response
    assert smollm2_tokenizer.decode(ours[0]["chosen_ids"][-2:]) == "<|im_end|>\n"


def test_every_trl_loss_name_is_served_or_refused_by_name(tmp_path):
    served = set(supported_loss_types())
    for name in TRL_LOSS_TYPES:
        args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type=[name],
                         label_smoothing=0.1 if name in ("exo_pair", "robust") else 0.0)
        if name in served:
            assert objective_from_config(args) is not None
        else:
            with pytest.raises(ValueError, match=f"{name!r} is not supported.*supported: sigmoid"):
                objective_from_config(args)


def _trl_loss(args, per_token, completion_mask, ref_logps):
    """TRL 1.16's own DPOTrainer._compute_loss on given per-token log-probs (a stand-in model returns
    them; the reference comes as precomputed columns)."""
    from collections import defaultdict

    class Accelerator:
        device = torch.device("cpu")

        def gather(self, t):
            return t

        gather_for_metrics = gather

    zeros = torch.zeros_like(per_token)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                    aux_loss=None)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), beta=args.beta,
        label_smoothing=args.label_smoothing, use_weighting=False, args=args,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    B = per_token.shape[0] // 2
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_logps[:B],
              "ref_rejected_logps": ref_logps[B:]}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


def _loss_cases():
    served = [n for n in supported_loss_types() if n in TRL_LOSS_TYPES]
    cases = [({"loss_type": [n], "label_smoothing": 0.1 if n in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0},
              n) for n in served]
    cases += [({"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}, "sigmoid-js"),
              ({"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
               "hinge-alpha"),
              ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]}, "sigmoid+sft"),
              ({"loss_type": ["apo_zero", "nca_pair", "discopop"], "loss_weights": [0.5, 1.0, 2.0]}, "mix3")]
    return [pytest.param(settings, id=name) for settings, name in cases]


@pytest.mark.parametrize("settings", _loss_cases())
def test_served_loss_types_compute_trl_116s_loss(tmp_path, settings):
    """FusedDPOTrainer's loss (objective_from_config + trl_counts on log-prob sums) equals TRL 1.16's
    own loss code on the same per-token log-probs; one row has no prompt (its first token unscored)."""
    from fastpref.integrations.trl import trl_counts

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.2, **settings)
    g = torch.Generator().manual_seed(0)
    B, T = 6, 12
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        start = 0 if row == 1 else int(torch.randint(1, 5, (), generator=g))
        end = int(torch.randint(start + 2, T + 1, (), generator=g))
        completion[row, start:end] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 4 * completion[:, 1:]  # fp32, as in training
    ref = per_token.sum(1) + torch.randn(2 * B, generator=g) * 3
    expected = _trl_loss(args, per_token, completion, ref)
    objective = objective_from_config(args)
    got = objective(per_token.sum(1), counts=trl_counts(objective, completion), ref_logps=ref).loss
    assert float(got) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
