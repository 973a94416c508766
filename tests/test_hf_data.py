"""Preference data: both JSONL formats, chat templates, prompt masking, truncation, malformed records and
collation. The tokenizer is a byte-level BPE with a ChatML template built in memory (no hub)."""
import json

import pytest
import torch

from fastpref.hf.data import (
    IGNORE_INDEX,
    DataError,
    PreferenceCollator,
    TokenizeOptions,
    load_preferences,
)
from fastpref.models import tiny_tokenizer

CORPUS = [
    "What is the capital of France? The capital of France is Paris. It is Berlin.",
    "How many legs does a spider have? A spider has eight legs. Six legs.",
    "user assistant system hello world this is a test",
    "hello world " * 20,
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS * 4, vocab_size=400)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_paired_text_masks_prompt_and_appends_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?",
                                                "chosen": " Paris.", "rejected": " Berlin."}])
    data = load_preferences(path, tok, max_length=None, max_prompt_length=None)
    assert data.format == "paired" and len(data) == 1 and data.report.loaded == 1
    ex = data[0]
    assert ex["prompt_ids"] == ids(tok, "What is the capital of France?")  # this tokenizer adds no BOS
    assert ex["chosen_ids"] == ids(tok, " Paris.") + [tok.eos_token_id]
    assert ex["rejected_ids"] == ids(tok, " Berlin.") + [tok.eos_token_id]
    batch = PreferenceCollator(tok.pad_token_id)([ex])
    P, C, R = len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])
    assert batch["input_ids"].shape == (2, P + max(C, R))
    assert (batch["labels"][:, :P] == IGNORE_INDEX).all()
    assert batch["labels"][0, P:P + C].tolist() == ex["chosen_ids"]
    assert batch["labels"][1, P:P + R].tolist() == ex["rejected_ids"]
    assert batch["attention_mask"].sum(1).tolist() == [P + C, P + R]
    assert batch["num_tokens"] == 2 * P + C + R


def test_paired_chat_uses_template_and_masks_it(tok):
    rec = {"prompt": [{"role": "user", "content": "How many legs does a spider have?"}],
           "chosen": [{"role": "assistant", "content": "A spider has eight legs."}],
           "rejected": [{"role": "assistant", "content": "Six legs."}]}
    ex = load_preferences([rec], tok)[0]
    prompt_text = "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex["prompt_ids"]) == prompt_text
    # As TRL: the response is the rest of the rendered conversation -- the template's end of turn
    # (<|im_end|>, the eos) and the newline after it; no second eos.
    assert tok.decode(ex["chosen_ids"]) == "A spider has eight legs.<|im_end|>\n"
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1
    assert tok.decode(ex["rejected_ids"]) == "Six legs.<|im_end|>\n"


def test_implicit_prompt_is_the_shared_prefix(tok):
    user = {"role": "user", "content": "hello"}
    rec = {"chosen": [user, {"role": "assistant", "content": "hello world"}],
           "rejected": [user, {"role": "assistant", "content": "test"}]}
    explicit = {"prompt": [user], "chosen": rec["chosen"][1:], "rejected": rec["rejected"][1:]}
    a, b = load_preferences([rec], tok)[0], load_preferences([explicit], tok)[0]
    assert {k: a[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
           {k: b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_pointwise_bool_and_float_labels(tok, tmp_path):
    rows = [{"prompt": "hello", "completion": " world", "label": True},
            {"prompt": "hello", "completion": " test", "label": False},
            {"prompt": "hello", "completion": " this", "label": 0.25, "ref_logps": -3.5}]
    data = load_preferences(write_jsonl(tmp_path / "u.jsonl", rows), tok)
    assert data.format == "pointwise"
    assert [ex["label"] for ex in data] == [1.0, 0.0, 0.25]
    batch = PreferenceCollator(tok.pad_token_id)(data.examples)
    assert batch["input_ids"].shape[0] == 3
    assert batch["sample_labels"].tolist() == [1.0, 0.0, 0.25]
    assert "ref_logps" not in batch  # only when every example carries one
    assert "ref_logps" in PreferenceCollator(tok.pad_token_id)(data.examples[2:])


def test_kl_pairs_rotate_completions(tok):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}", "label": i % 2 == 0} for i in range(3)]
    data = load_preferences(rows, tok, kl_pairs=True)
    for i, ex in enumerate(data):
        assert ex["kl_prompt_ids"] == ex["prompt_ids"]
        assert ex["kl_completion_ids"] == data[i - 1]["completion_ids"]
    batch = PreferenceCollator(tok.pad_token_id)(data.examples)
    assert batch["kl_input_ids"].shape[0] == 3 and "kl_labels" in batch


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    (json.dumps({"prompt": "a", "chosen": "b"}), "missing key 'rejected'"),
    (json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}), "'chosen': expected a string"),
    (json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}), "'chosen': empty string"),
    (json.dumps({"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}), "'chosen'[0]"),
    (json.dumps({"prompt": "a", "completion": "b", "label": "yes"}), "pointwise record in a paired file"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1.0}), "without its counterpart"),
])
def test_malformed_line_is_reported_with_its_number(tok, tmp_path, line, message):
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, line, good])
    with pytest.raises(DataError, match=rf"bad\.jsonl:4: .*{message[:20]}".replace("[", r"\[").replace("'", ".")):
        load_preferences(path, tok)
    data = load_preferences(path, tok, skip_invalid=True)
    assert len(data) == 3
    assert [line for line, _ in data.report.skipped] == [4]
    assert "1 invalid skipped" in data.report.summary()


def test_bad_pointwise_label_and_all_invalid(tok, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": None}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: 'label': expected a finite number"):
        load_preferences(path, tok)
    with pytest.raises(DataError, match="no valid record"):
        load_preferences(path, tok, skip_invalid=True)


def test_format_forced_and_chat_without_template(tok):
    with pytest.raises(DataError, match="missing key 'completion'"):
        load_preferences([{"prompt": "a", "chosen": "b", "rejected": "c"}], tok, format="pointwise")
    plain = tiny_tokenizer(CORPUS, vocab_size=300)
    plain.chat_template = None
    rec = {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
           "rejected": [{"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match="no chat template"):
        load_preferences([rec], plain)


# -- truncation ------------------------------------------------------------------------------


def _lens(ex):
    return len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])


def make_rec(tok, n_prompt, n_chosen, n_rejected):
    # one token per word in this tokenizer for these words ("hello" and " world" are in the vocab)
    word = lambda n: "hello" + " world" * (n - 1)  # noqa: E731
    rec = {"prompt": word(n_prompt), "chosen": " world" * n_chosen, "rejected": " world" * n_rejected}
    ex = load_preferences([rec], tok, max_length=None, max_prompt_length=None, add_eos=False)[0]
    assert _lens(ex) == (n_prompt, n_chosen, n_rejected)
    return rec


def test_truncation_keep_end_trims_prompt_from_the_left(tok):
    rec = make_rec(tok, 10, 4, 6)
    full = load_preferences([rec], tok, max_length=None, max_prompt_length=None, add_eos=False)[0]
    ex = load_preferences([rec], tok, max_length=12, max_prompt_length=None, add_eos=False)[0]
    assert _lens(ex) == (6, 4, 6)  # room for the longer response; identical prompt for both
    assert ex["prompt_ids"] == full["prompt_ids"][-6:]
    # prompt cap first, then the total
    ex = load_preferences([rec], tok, max_length=100, max_prompt_length=3, add_eos=False)[0]
    assert ex["prompt_ids"] == full["prompt_ids"][-3:]
    # a response longer than max_length: keep one prompt token, cut the response's end
    ex = load_preferences([rec], tok, max_length=5, max_prompt_length=None, add_eos=False)[0]
    assert _lens(ex) == (1, 4, 4)
    assert ex["rejected_ids"] == full["rejected_ids"][:4]


def test_truncation_keep_start_and_completion_cap(tok):
    rec = make_rec(tok, 10, 4, 6)
    full = load_preferences([rec], tok, max_length=None, max_prompt_length=None, add_eos=False)[0]
    ex = load_preferences([rec], tok, max_length=12, max_prompt_length=None, truncation_mode="keep_start",
                          add_eos=False)[0]
    assert _lens(ex) == (10, 2, 2)
    assert ex["prompt_ids"] == full["prompt_ids"] and ex["chosen_ids"] == full["chosen_ids"][:2]
    ex = load_preferences([rec], tok, max_length=None, max_prompt_length=4, truncation_mode="keep_start",
                          max_completion_length=3, add_eos=False)[0]
    assert ex["prompt_ids"] == full["prompt_ids"][:4] and _lens(ex) == (4, 3, 3)
    report = load_preferences([rec, rec], tok, max_length=12, max_prompt_length=None, add_eos=False).report
    assert report.truncated == 2


def test_truncation_that_leaves_no_response_is_an_error(tok):
    rec = make_rec(tok, 10, 4, 6)
    with pytest.raises(DataError, match="record 1: no response token left"):
        load_preferences([rec], tok, max_length=10, max_prompt_length=None, truncation_mode="keep_start")


def test_tokenize_options_validation():
    with pytest.raises(ValueError, match="truncation_mode"):
        TokenizeOptions(truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length"):
        TokenizeOptions(max_length=0)


# -- collation -------------------------------------------------------------------------------


def test_collator_left_padding_and_multiple_of(tok):
    rows = [{"prompt": "hello", "chosen": " world world world", "rejected": " test"},
            {"prompt": "hello world", "chosen": " this", "rejected": " is a test", "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0}]
    data = load_preferences(rows, tok)
    right = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)(data.examples)
    left = PreferenceCollator(tok.pad_token_id, padding_side="left")(data.examples)
    assert right["input_ids"].shape[1] % 8 == 0
    assert "ref_logps" not in right
    for i in range(4):
        n = int(left["attention_mask"][i].sum())
        assert left["attention_mask"][i, -n:].all() and not left["attention_mask"][i, :-n].any()
        assert left["input_ids"][i, -n:].tolist() == right["input_ids"][i, :n].tolist()
        assert left["labels"][i, -n:].tolist() == right["labels"][i, :n].tolist()
    # rows: chosen 0, chosen 1, rejected 0, rejected 1
    assert right["labels"][0][right["labels"][0] != IGNORE_INDEX].tolist() == data[0]["chosen_ids"]
    assert right["labels"][2][right["labels"][2] != IGNORE_INDEX].tolist() == data[0]["rejected_ids"]
    with_ref = PreferenceCollator(tok.pad_token_id)(data.examples[1:])
    assert with_ref["ref_logps"].tolist() == [-1.0, -2.0]


def test_collator_packed_matches_padded(tok):
    rows = [{"prompt": "hello", "chosen": " world world", "rejected": " test"},
            {"prompt": "hello world", "chosen": " this", "rejected": " is a test"}]
    data = load_preferences(rows, tok)
    pad = PreferenceCollator(tok.pad_token_id)(data.examples)
    pk = PreferenceCollator(tok.pad_token_id, packed=True)(data.examples)
    mask = pad["attention_mask"].bool()
    assert pk["input_ids"].shape == (1, int(mask.sum()))
    assert pk["input_ids"][0].tolist() == pad["input_ids"][mask].tolist()
    assert pk["labels"][0].tolist() == pad["labels"][mask].tolist()
    lengths = mask.sum(1)
    assert pk["cu_seqlens"].tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    assert pk["seq_ids"].tolist() == torch.repeat_interleave(torch.arange(4), lengths).tolist()
    assert pk["position_ids"][0].tolist() == [p for n in lengths.tolist() for p in range(n)]
    assert pk["num_seqs"] == 4 and pk["max_seqlen"] == int(lengths.max())
    assert pk["num_tokens"] == pad["num_tokens"]


def test_split_is_seeded_and_disjoint(tok):
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(20)]
    data = load_preferences(rows, tok)
    tr, ev = data.split(0.25, seed=3)
    tr2, ev2 = data.split(0.25, seed=3)
    assert len(ev) == 5 and len(tr) == 15
    assert [e["line"] for e in ev] == [e["line"] for e in ev2]
    assert not {e["line"] for e in ev} & {e["line"] for e in tr}


def test_builtin_demo_set_loads(tok):
    from fastpref.train import demo_data_path

    data = load_preferences(demo_data_path(), tok)
    assert data.format == "paired" and len(data) >= 40 and not data.report.skipped
