"""KLDPO (and the other all-gathering losses) across a 2-process gloo group equal one process on the
concatenated batch: same weights, and DDP-averaged gradients equal the single-process gradients."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastpref.losses import FusedPreferenceLoss, kldpo_loss, kldpo_weights, kto_loss

WORLD = 2
PAIRS_PER_RANK = 3
T, H, V = 9, 16, 29
TAU = 0.3
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    """Chosen/rejected hidden states for all pairs, plus reference log-probs and an lm_head."""
    gen = torch.Generator().manual_seed(0)
    n = WORLD * PAIRS_PER_RANK
    chosen = torch.randn(n, T, H, generator=gen)
    rejected = torch.randn(n, T, H, generator=gen)
    labels_c = torch.randint(0, V, (n, T), generator=gen)
    labels_r = torch.randint(0, V, (n, T), generator=gen)
    labels_c[:, :3] = -100
    labels_r[:, :2] = -100
    labels_r[:, -2:] = -100
    ref_c = -30 + 5 * torch.randn(n, generator=gen)
    ref_r = -30 + 5 * torch.randn(n, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    return chosen, rejected, labels_c, labels_r, ref_c, ref_r, weight


def _paired_rows(idx, batch):
    """Rows in the paired layout (chosen block, then rejected block) for the pairs ``idx``."""
    chosen, rejected, labels_c, labels_r, ref_c, ref_r, _ = batch
    hidden = torch.cat([chosen[idx], rejected[idx]])
    labels = torch.cat([labels_c[idx], labels_r[idx]])
    ref = torch.cat([ref_c[idx], ref_r[idx]])
    return hidden, labels, ref


def _kldpo_step(idx, batch, group):
    weight = batch[-1].clone().requires_grad_()
    hidden, labels, ref = _paired_rows(idx, batch)
    hidden.requires_grad_()
    # backend="torch": the op is not under test here, and it starts fastest in fresh processes
    module = FusedPreferenceLoss("kldpo", beta=0.1, tau=TAU, backend="torch")
    out = module(hidden, weight, labels, ref_logps=ref, group=group)
    out.loss.backward()
    return out.metrics.weights, weight.grad, hidden.grad


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        group = dist.group.WORLD
        batch = _global_batch()
        idx = torch.arange(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
        weights, grad_w, grad_h = _kldpo_step(idx, batch, group)
        dist.all_reduce(grad_w)  # what DDP does: average the gradients of the local means
        grad_w /= WORLD

        # uneven local batches: the weights still use the global mean
        gen = torch.Generator().manual_seed(1)
        losses = torch.rand(5, generator=gen)
        uneven = kldpo_weights(losses[:2] if rank == 0 else losses[2:], tau=TAU, group=group)

        # KTO's z0: per-rank KL means, gathered and averaged
        kl_p = torch.arange(4.0) + 10 * rank
        kl_r = torch.zeros(4)
        kto = kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), kl_p, kl_r, group=group)
        torch.save({"weights": weights, "grad_w": grad_w, "grad_h": grad_h, "uneven": uneven, "z0": kto.kl},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_kldpo_two_process_gloo_matches_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    batch = _global_batch()
    all_idx = torch.arange(WORLD * PAIRS_PER_RANK)
    weights, grad_w, grad_h = _kldpo_step(all_idx, batch, None)
    n = PAIRS_PER_RANK
    for r, res in enumerate(results):
        torch.testing.assert_close(res["weights"], weights[r * n:(r + 1) * n], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res["grad_w"], grad_w, rtol=1e-5, atol=1e-6)
        # hidden rows of rank r: its chosen block then its rejected block; local mean over n of 2n pairs
        chosen = grad_h[r * n:(r + 1) * n]
        rejected = grad_h[WORLD * n + r * n: WORLD * n + (r + 1) * n]
        torch.testing.assert_close(res["grad_h"] / WORLD, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-7)

    losses = torch.rand(5, generator=torch.Generator().manual_seed(1))
    full = kldpo_weights(losses, tau=TAU)
    torch.testing.assert_close(torch.cat([results[0]["uneven"], results[1]["uneven"]]), full)
    z0 = ((torch.arange(4.0)).mean() + (torch.arange(4.0) + 10).mean()) / 2
    for res in results:
        torch.testing.assert_close(res["z0"], z0)


def test_no_group_is_the_local_batch():
    losses = torch.tensor([0.2, 0.9, 0.4])
    torch.testing.assert_close(kldpo_weights(losses, tau=0.5, group=None),
                               torch.exp((losses - losses.mean()) / 0.5).clamp(max=10))
    zero = torch.zeros(3)
    out = kldpo_loss(losses, zero, zero, zero, tau=0.5)
    assert out.weights.shape == (3,)
