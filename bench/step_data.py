"""Synthetic preference data from real English text, to a target token-length distribution (issue 8).

The step benchmark (``bench/step_vs_trl.py``) needs preference pairs that look like real multi-turn
dialogue data without downloading any: the text comes from English prose already on the machine
(the Python standard library's docstrings and the licence texts under ``/usr/share/common-licenses``),
the shape from the issue's measured length distribution (SmolLM2 tokens, chat template included)::

    prompt    median 107, p90 223        chosen   median 26, p90 74        rejected   median 34, p90 89

Each length is drawn from a log-normal fitted to its median and p90 (``mu = ln median``,
``sigma = ln(p90 / median) / z_0.9``); a draw whose prompt + longer response exceeds ``max_length`` is
redrawn (the distribution is truncated there, as a data pipeline's length filter would). A prompt
is a conversation (SmolLM2's default system turn, then user / assistant turns ending on a user turn)
whose rendered token count hits the drawn length; the responses are single assistant turns.

Record ``i`` depends only on ``(seed, i)``, so the first ``B`` records of any larger set are the same:
the memory-cap search grows the batch without changing the pairs already in it.

Token ids are produced the way TRL 1.16's ``DPOTrainer`` tokenises conversational records
(:func:`trl_token_ids`: the prompt rendered with the generation prompt, prompt + response rendered
whole, the response starts where the two token lists diverge) and the way ``fastpref.hf.data`` does
(:func:`fastpref_token_ids`); :func:`compare_tokenizations` says where they differ.
"""
from __future__ import annotations

import ast
import math
import random
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# z such that P(Z <= z) = 0.9 for a standard normal.
Z90 = 1.2815515655446004

# (median, p90) in SmolLM2 tokens, as TRL counts them (the response includes "<|im_end|>\n").
LENGTHS = {"prompt": (107, 223), "chosen": (26, 74), "rejected": (34, 89)}

LICENSE_DIR = Path("/usr/share/common-licenses")
_WS = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------
# corpus


def _docstrings(path: Path) -> List[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                out.append(doc)
    return out


def _prose(text: str) -> List[str]:
    """Paragraphs that read as prose: enough letters, few code-like symbols."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", para).strip()
        if len(para) < 120:
            continue
        letters = sum(c.isalpha() or c == " " for c in para)
        if letters / len(para) < 0.85 or para.count(">>>") or para.count("()") > 2:
            continue
        out.append(para)
    return out


def english_paragraphs(max_chars: int = 3_000_000) -> List[str]:
    """English prose paragraphs from this machine, in a fixed order (no network).

    Sources: ``/usr/share/common-licenses/*`` (if present) and the docstrings of the Python standard
    library's modules (parsed with ``ast``, never imported; ``test`` packages left out)."""
    paras: List[str] = []
    if LICENSE_DIR.is_dir():
        for f in sorted(LICENSE_DIR.iterdir()):
            if f.is_file():
                paras += _prose(f.read_text(encoding="utf-8", errors="replace"))
    stdlib = Path(ast.__file__).resolve().parent
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).parts
        if rel[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel:
            continue
        for doc in _docstrings(f):
            paras += _prose(doc)
        if sum(map(len, paras)) > max_chars:
            break
    if not paras:
        raise RuntimeError("no English prose found on this machine (looked in /usr/share/common-licenses and "
                           f"the docstrings under {stdlib})")
    return paras


class TextSource:
    """Draws English snippets of a given token count from :func:`english_paragraphs`."""

    def __init__(self, tokenizer, paragraphs: Optional[List[str]] = None):
        self.tok = tokenizer
        self.words = " ".join(paragraphs or english_paragraphs()).split(" ")

    def snippet(self, rng: random.Random, n_tokens: int) -> str:
        """About ``n_tokens`` tokens (exact when the cut falls on a word boundary) of consecutive words
        from a random place, starting at a sentence start when one is near."""
        n_tokens = max(1, int(n_tokens))
        start = rng.randrange(max(1, len(self.words) - 4 * n_tokens - 64))
        for k in range(start, min(start + 40, len(self.words) - 1)):
            if self.words[k].endswith("."):
                start = k + 1
                break
        text = " ".join(self.words[start:start + 2 * n_tokens + 8])
        ids = self.tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
        out = self.tok.decode(ids)
        return out.strip() or "Yes."


# ---------------------------------------------------------------------------------------------
# lengths


def lognormal(median: float, p90: float) -> Tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with this median and 90th percentile."""
    return math.log(median), math.log(p90 / median) / Z90


def draw_lengths(rng: random.Random, max_length: int, *, min_prompt: int = 30) -> Tuple[int, int, int]:
    """``(prompt, chosen, rejected)`` token counts (TRL's counting), prompt + longer response <= max_length."""
    for _ in range(10_000):
        p, c, r = (max(lo, round(rng.lognormvariate(*lognormal(*LENGTHS[k]))))
                   for k, lo in (("prompt", min_prompt), ("chosen", 3), ("rejected", 3)))
        if p + max(c, r) <= max_length:
            return p, c, r
    raise ValueError(f"max_length={max_length}: too short for the length distribution")


# ---------------------------------------------------------------------------------------------
# records


def _render_len(tok, messages, generation_prompt: bool) -> int:
    return len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                       return_dict=True)["input_ids"])


def dialogue_prompt(tok, src: TextSource, rng: random.Random, target: int) -> List[Dict[str, str]]:
    """A user/assistant conversation ending on a user turn whose rendered prompt (generation prompt
    included) has ``target`` tokens, or as close as a word boundary allows."""
    turns = 1 + 2 * min(rng.randrange(0, 1 + target // 90), 4)  # 1, 3, 5 ... messages
    while True:
        empty = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(turns)]
        budget = target - _render_len(tok, empty, True) + turns  # "x" is one token per message
        if budget >= 3 * turns or turns == 1:
            break
        turns -= 2
    budget = max(budget, 1)
    weights = [rng.random() + 0.3 for _ in range(turns)]
    sizes = [max(1, int(budget * w / sum(weights))) for w in weights]
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": src.snippet(rng, n)}
            for i, n in enumerate(sizes)]
    # Land on the target: resize the last user turn (a few tries; tokens can merge at the seams).
    for _ in range(4):
        diff = target - _render_len(tok, msgs, True)
        if diff == 0:
            break
        last_n = len(tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"])
        msgs[-1]["content"] = src.snippet(rng, max(1, last_n + diff))
    return msgs


def make_records(tokenizer, n: int, *, seed: int = 0, max_length: int = 512,
                 source: Optional[TextSource] = None) -> List[Dict[str, Any]]:
    """``n`` conversational DPO records ``{"prompt": [...], "chosen": [...], "rejected": [...]}``
    (TRL's conversational preference format); record ``i`` depends only on ``(seed, i)``."""
    src = source or TextSource(tokenizer)
    out = []
    for i in range(n):
        rng = random.Random(f"fastpref-step-data:{seed}:{i}")
        p, c, r = draw_lengths(rng, max_length)
        prompt = dialogue_prompt(tokenizer, src, rng, p)
        # The rendered response is content + "<|im_end|>" + "\n": 2 template tokens.
        chosen = [{"role": "assistant", "content": src.snippet(rng, max(1, c - 2))}]
        rejected = [{"role": "assistant", "content": src.snippet(rng, max(1, r - 2))}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def make_annotation_records(tokenizer, n: int, *, candidates: int = 4, seed: int = 0,
                            max_length: int = 512, source: Optional[TextSource] = None) -> List[Dict[str, Any]]:
    """``n`` CDR input records ``{"prompt": [...], "responses": [text x candidates]}`` (prompts and
    response lengths from the same distribution as :func:`make_records`)."""
    src = source or TextSource(tokenizer)
    out = []
    for i in range(n):
        rng = random.Random(f"fastpref-annotate-data:{seed}:{i}")
        p, _, _ = draw_lengths(rng, max_length)
        prompt = dialogue_prompt(tokenizer, src, rng, p)
        mu, sigma = lognormal(*LENGTHS["chosen"])
        resp = [src.snippet(rng, max(1, min(max_length - p, round(rng.lognormvariate(mu, sigma))) - 2))
                for _ in range(candidates)]
        out.append({"prompt": prompt, "responses": resp})
    return out


CRITERIA_SYSTEM_PROMPT = (
    "You are a careful assistant. A good answer addresses the user's actual request, is correct and "
    "specific, states its assumptions, and stays concise; it quotes the relevant part of the source text "
    "when the user asks about a document, and it says plainly when the text does not contain the answer. "
    "A bad answer is vague, repeats the question, invents facts that the conversation does not support, "
    "changes the subject, or pads the reply with boilerplate. Prefer plain language over jargon, keep "
    "lists short, and never claim to have done something you did not do."
)


def exemplar_blocks(tokenizer, *, n_blocks: int = 2, per_block: int = 2, seed: int = 0,
                    source: Optional[TextSource] = None) -> List[Dict[str, Any]]:
    """In-context exemplar blocks (``fastpref.annotate.cdr`` JSON form) built from the same prose:
    a criterion and ``per_block`` request / good / bad / explanation exemplars each."""
    src = source or TextSource(tokenizer)
    rng = random.Random(f"fastpref-exemplars:{seed}")
    blocks = []
    for b in range(n_blocks):
        exs = [{"prompt": src.snippet(rng, 30), "good": src.snippet(rng, 50), "bad": src.snippet(rng, 35),
                "explanation": src.snippet(rng, 20)} for _ in range(per_block)]
        blocks.append({"criterion": f"Criterion {b + 1}: " + src.snippet(rng, 25), "examples": exs})
    return blocks


# ---------------------------------------------------------------------------------------------
# tokenisation, both ways


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trl_token_ids(tokenizer, records: Sequence[Dict[str, Any]]) -> List[Dict[str, List[int]]]:
    """Token ids as TRL 1.16's ``DPOTrainer`` makes them from conversational records: the prompt with
    the generation prompt, prompt + chosen and prompt + rejected rendered whole (the chat template's
    trailing newline after ``<|im_end|>`` stays in the response), prompt = the shorter common prefix."""
    out = []
    for rec in records:
        enc = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
        p = list(enc(rec["prompt"], True))
        pc = list(enc(rec["prompt"] + rec["chosen"], False))
        pr = list(enc(rec["prompt"] + rec["rejected"], False))
        n = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out.append({"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]})
    return out


def fastpref_token_ids(tokenizer, records: Sequence[Dict[str, Any]]) -> List[Dict[str, List[int]]]:
    """Token ids from ``fastpref.hf.data.load_preferences`` (no truncation)."""
    from fastpref.hf.data import load_preferences

    data = load_preferences(list(records), tokenizer, format="paired", max_length=None, max_prompt_length=None)
    return [{k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in data.examples]


def compare_tokenizations(tokenizer, a: Sequence[Dict[str, List[int]]], b: Sequence[Dict[str, List[int]]],
                          names: Tuple[str, str] = ("TRL", "fastpref")) -> Dict[str, Any]:
    """Per field, how many records agree, and for the first that does not, where and how they differ."""
    out: Dict[str, Any] = {"records": len(a)}
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        same = sum(x[key] == y[key] for x, y in zip(a, b))
        entry: Dict[str, Any] = {"identical": same}
        for x, y in zip(a, b):
            if x[key] != y[key]:
                n = _common_prefix(x[key], y[key])
                entry["first_difference"] = {
                    "common_prefix_tokens": n,
                    f"{names[0]}_tail": tokenizer.decode(x[key][n:]),
                    f"{names[1]}_tail": tokenizer.decode(y[key][n:]),
                    f"{names[0]}_len": len(x[key]), f"{names[1]}_len": len(y[key]),
                }
                break
        out[key] = entry
    return out


def length_stats(examples: Sequence[Dict[str, List[int]]]) -> Dict[str, Any]:
    """Median / p90 / max token counts per field, real tokens of the padded layout and its fill."""
    def q(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))]

    out: Dict[str, Any] = {}
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        xs = [len(ex[key]) for ex in examples]
        out[key[:-4]] = {"median": statistics.median(xs), "p90": q(xs, 0.9), "max": max(xs)}
    seqs = [len(ex["prompt_ids"]) + len(ex[k]) for ex in examples for k in ("chosen_ids", "rejected_ids")]
    real = sum(seqs)
    out["sequence_tokens"] = real
    out["padded_slots"] = len(seqs) * max(seqs)
    out["padded_fill"] = real / out["padded_slots"]
    shared = sum(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)
    out["prompt_shared_tokens"] = shared
    return out


def build(tokenizer, n: int, *, seed: int = 0, max_length: int = 512) -> Dict[str, Any]:
    """Everything the benchmark's children need: records, both tokenisations, their comparison, stats."""
    records = make_records(tokenizer, n, seed=seed, max_length=max_length)
    trl_ids = trl_token_ids(tokenizer, records)
    fp_ids = fastpref_token_ids(tokenizer, records)
    return {"seed": seed, "max_length": max_length, "records": records, "trl_ids": trl_ids,
            "fastpref_ids": fp_ids, "tokenization": compare_tokenizations(tokenizer, trl_ids, fp_ids),
            "stats": length_stats(trl_ids)}


if __name__ == "__main__":  # a quick look: python bench/step_data.py [n]
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastpref.models import load_smollm2

    _, tok = load_smollm2()
    d = build(tok, int(sys.argv[1]) if len(sys.argv) > 1 else 64)
    print(json.dumps({"stats": d["stats"], "tokenization": d["tokenization"]}, indent=1))
    print(json.dumps(d["records"][0], indent=1)[:2000])
