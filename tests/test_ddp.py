"""DDP: two gloo processes on CPU, each with half of every batch, produce the same gradients (and the
same logged loss) as one process on the whole batch. Checked for sigmoid DPO with gradient
accumulation (``no_sync`` on the first micro-batch) and for KLDPO, whose per-pair weights need the
losses of every rank (all-gathered through the process group)."""
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastpref.hf import load_preferences
from fastpref.models import tiny_model, tiny_tokenizer
from fastpref.train import Trainer, TrainConfig, demo_data_path

CASES = {
    # name: (loss, examples per process per micro-batch in the 2-process run, grad_accum)
    "sigmoid-accum": ("sigmoid", 1, 2),
    "kldpo": ("kldpo", 2, 1),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_grads(model, data, pad_id, loss, batch_size, grad_accum):
    cfg = TrainConfig(loss=loss, learning_rate=1e-3, batch_size=batch_size, grad_accum=grad_accum, max_steps=1,
                      shuffle=True, seed=3, progress=False, precision="fp32")
    trainer = Trainer(model, data, cfg, pad_token_id=pad_id, log=None)
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append({n: p.grad.detach().clone() for n, p in
                                                trainer.policy.named_parameters() if p.requires_grad}))
    record = trainer.train()[0]
    return grads[0], record["loss"]


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        setup = torch.load(path, weights_only=False)
        out = {}
        for name, (loss, bs, accum) in CASES.items():
            model = copy.deepcopy(setup["model"])
            out[name] = _step_grads(model, copy.deepcopy(setup["data"]), setup["pad"], loss, bs, accum)
        if rank == 0:
            torch.save(out, path + ".out")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    tok = tiny_tokenizer(open(demo_data_path()).read().splitlines(), vocab_size=500)
    model, _ = tiny_model("llama", tokenizer=tok, seed=0, hidden_size=32, num_layers=2)
    data = load_preferences(demo_data_path(), tok)
    data.examples = data.examples[:8]
    path = str(tmp_path / "setup.pt")
    torch.save({"model": model, "data": data, "pad": tok.pad_token_id}, path)

    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    ddp = torch.load(path + ".out", weights_only=False)

    for name, (loss, bs, accum) in CASES.items():
        # one process, the whole batch: 2 x bs examples per micro-batch
        single_grads, single_loss = _step_grads(copy.deepcopy(model), copy.deepcopy(data), tok.pad_token_id,
                                                loss, 2 * bs, accum)
        ddp_grads, ddp_loss = ddp[name]
        assert ddp_loss == pytest.approx(single_loss, abs=1e-6), name
        assert set(ddp_grads) == set(single_grads)
        for pname, g in single_grads.items():
            torch.testing.assert_close(ddp_grads[pname], g, atol=1e-6 * float(g.abs().max()) + 1e-9, rtol=1e-5,
                                       msg=lambda m: f"{name} {pname}: {m}")
