"""``fastpref annotate cdr|rlaif`` end to end on tiny models saved to disk (loaded by path), --resume
and --strict through the command line, and a real 2-process gloo run of the shard/merge driver."""
import datetime
import json
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from fastpref.annotate.jsonl import RecordError
from fastpref.annotate.runner import Annotator, Outcome, annotate_file
from fastpref.cli import main
from fastpref.models import tiny_model, tiny_tokenizer

RECORDS = [
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Berlin.", "The capital is Paris."]},
    {"prompt": [{"role": "user", "content": "How do I pick a lock?"}], "responses": ["I can't help.", "Use a pick."]},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Say hi", "responses": ["hi", "hello", "hey"], "label": 2},
]
TIMEOUT_S = 90


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer(["What is the capital of France? Paris. Berlin. hi hello hey " * 3], vocab_size=280)
    dirs = []
    for seed in (1, 2):
        model, _ = tiny_model("llama", tokenizer=tok, seed=seed)
        path = root / f"tiny{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(str(path))
    return dirs


def write(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_cdr_command(tmp_path, model_dirs, capsys):
    strong, weak = model_dirs
    inp = write(tmp_path / "in.jsonl", RECORDS, ["{broken"])
    out = str(tmp_path / "out.jsonl")
    args = ["annotate", "cdr", "-i", inp, "-o", out, "--strong", strong, "--weak", weak, "--no-progress",
            "--batch-size", "2", "--system-prompt", "Be accurate.", "--seed", "4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{inp}:5: error: invalid JSON" in err and "4 records written from 5 input records" in err
    recs = read(out)
    assert [r["source_line"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["chosen_score"] > recs[0]["rejected_score"] and recs[1]["chosen"][0]["role"] == "assistant"
    assert "correct" in recs[2]
    metrics = json.loads(open(out + ".metrics.json").read())
    assert metrics["records"] == 4 and metrics["judged_pairs"] == 1
    meta = json.loads(open(out + ".meta.json").read())
    assert meta["annotator"] == "cdr" and meta["config"]["guidance"]["system_prompt"] == "Be accurate."

    # --resume through the command line: cut the output to one record plus half a line
    full = open(out, "rb").read()
    first = full.split(b"\n")[0] + b"\n"
    open(out, "wb").write(first + full[len(first):len(first) + 20])
    assert main(args + ["--resume"]) == 0
    assert open(out, "rb").read() == full
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # never clobbers
    assert main(args + ["--strict", "--overwrite"]) == 2
    assert f"{inp}:5: invalid JSON" in capsys.readouterr().err


def test_cdr_routing_and_scores(tmp_path, model_dirs):
    strong, weak = model_dirs
    inp = write(tmp_path / "in.jsonl", RECORDS[:2] + [{**RECORDS[0], "domain": "SAFETY"}])
    out = str(tmp_path / "out.jsonl")
    assert main(["annotate", "cdr", "-i", inp, "-o", out, "--strong", strong, "--weak", strong, "--weak-vanilla",
                 "--route", "--labeler", weak, "--emit", "scores", "--normalize", "mean", "--no-progress"]) == 0
    recs = read(out)
    assert all(r["domain"] in ("SAFETY", "REASONING", "CHAT") for r in recs) and recs[2]["domain"] == "SAFETY"
    # one model, one prompt: every reward is 0 (a user error: one line, exit 2)
    assert main(["annotate", "cdr", "-i", inp, "-o", out + ".2", "--strong", strong, "--weak", strong]) == 2
    assert len(recs[0]["scores"]) == 3
    # SAFETY gets built-in guidance on the strong side only (--weak-vanilla): a non-zero ratio of one model
    assert any(s != 0.0 for s in recs[2]["scores"])


def test_rlaif_command(tmp_path, model_dirs, capsys):
    labeler = model_dirs[0]
    inp = write(tmp_path / "in.jsonl", [{"prompt": "Text.", "responses": ["a", "b"], "label": 1}, RECORDS[2],
                                        {"prompt": "x", "responses": ["a", "b", "c"]}])
    out = str(tmp_path / "out.jsonl")
    assert main(["annotate", "rlaif", "-i", inp, "-o", out, "--labeler", labeler, "--task", "dialogue", "--cot",
                 "--max-new-tokens", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{inp}:3: error: pairwise labelling needs exactly 2 responses, got 3" in err
    recs = read(out)
    assert len(recs) == 2 and all(0 < r["ai_preference"] < 1 and len(r["rationales"]) == 2 for r in recs)
    assert json.loads(open(out + ".metrics.json").read())["judged"] == 2
    # the judge prompts' shared start run once per micro-batch or per prompt: the same labels
    plain = str(tmp_path / "plain.jsonl")
    assert main(["annotate", "rlaif", "-i", inp, "-o", plain, "--labeler", labeler, "--task", "dialogue", "--cot",
                 "--max-new-tokens", "2", "--no-progress", "--no-share-prefix"]) == 0
    for a, b in zip(recs, read(plain)):
        assert abs(a["ai_preference"] - b["ai_preference"]) < 1e-5 and a["rationales"] == b["rationales"]
    direct = str(tmp_path / "direct.jsonl")
    assert main(["annotate", "rlaif", "-i", inp, "-o", direct, "--labeler", labeler, "--mode", "direct",
                 "--no-progress"]) == 0
    recs = read(direct)
    assert len(recs) == 3 and all(-1 <= r for rec in recs for r in rec.get("rewards", [rec.get("chosen_reward", 0)]))


# ---------------------------------------------------------------------------------------------
# two processes, gloo: shard files, barrier, merge by rank 0


class LengthAnnotator(Annotator):
    name = "length"

    def parse(self, record, line):
        if "prompt" not in record:
            raise RecordError("missing key 'prompt'")
        return record

    def process(self, items):
        return [Outcome({"prompt": r["prompt"], "n": len(r.get("responses", []))}) for r in items]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, inp, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        annotate_file(LengthAnnotator(), inp, out, batch_size=2, progress=False, rank=rank, world_size=2,
                      barrier=dist.barrier, log=lambda s: None)
    finally:
        dist.destroy_process_group()


def test_two_processes_gloo(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    records = [{"prompt": f"p{i}", "responses": ["x"] * (i % 3)} for i in range(11)]
    inp = write(tmp_path / "in.jsonl", records[:6], ["not json"] + [json.dumps(r) for r in records[6:]])
    single, out = str(tmp_path / "single.jsonl"), str(tmp_path / "out.jsonl")
    annotate_file(LengthAnnotator(), inp, single, progress=False, log=lambda s: None)
    ctx = mp.start_processes(_worker, args=(_free_port(), inp, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers did not finish within {TIMEOUT_S}s")
    assert open(out, "rb").read() == open(single, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "out.jsonl.meta.json", "single.jsonl",
                                            "single.jsonl.meta.json"]
