"""loco.DiLoCo over torch.distributed (gloo, two processes) against DiLoCo written in plain PyTorch.

The reference, inside each process: inner torch.optim.AdamW on the worker's own data; every H
steps the pseudo-gradient global - local is averaged with dist.all_reduce, the global parameters
take one torch.optim.SGD(nesterov=True) step with it as their gradient, and the worker restarts
from them. loco must agree within 1e-5 after 5 rounds. The same run checks the byte counters,
state_dict() round trips, Streaming DiLoCo and MuLoCo over the same communicator, that the
calls which give rank 1 rank 0's parameters (start(), and the first step() of a handle built with
start=False, whatever its gradient) make a graph built before them raise in backward() there,
and that processes built with different parameter lists fail together, one sentence, nothing
changed.
"""

import os
import random
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loco

SEED = int(os.environ.get("LOCO_TEST_SEED", random.randrange(2**31)))
os.environ["LOCO_TEST_SEED"] = str(SEED)  # the spawned workers import this file again
WORLD = 2
H = 4
ROUNDS = 5
SHAPES = {"w1": (16, 6), "b1": (16,), "w2": (3, 16), "b2": (3,)}
INNER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
OUTER = dict(lr=0.7, momentum=0.9)


def initial_values(rank):
    gen = torch.Generator().manual_seed(SEED * 7 + rank)
    return {n: torch.randn(s, generator=gen) * 0.5 for n, s in SHAPES.items()}


def batch(rank, step):
    gen = torch.Generator().manual_seed(SEED * 13 + 1000 * rank + step)
    x = torch.randn(32, 6, generator=gen)
    y = torch.randn(32, 3, generator=gen) + float(rank)  # the workers see different data
    return x, y


def loss_of(p, x, y):
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return ((h @ p["w2"].T + p["b2"] - y) ** 2).mean()


def model_params(rank):
    params = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values(rank).items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    return params


def train(opt, params, rank, first, last):
    for step in range(first, last):
        opt.zero_grad()
        x, y = batch(rank, step)
        loss_of(params, x, y).backward()
        opt.step()


def reference(rank, group=None):
    """DiLoCo in plain PyTorch: every worker starts from rank 0's values. `group`: a gloo group
    for these CPU tensors when the default one is NCCL (tests/python/test_cuda.py)."""
    local = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values(0).items()}
    glob = {n: torch.nn.Parameter(v.clone()) for n, v in initial_values(0).items()}
    inner = torch.optim.AdamW(local.values(), **INNER)
    outer = torch.optim.SGD(glob.values(), nesterov=True, **OUTER)
    for step in range(H * ROUNDS):
        inner.zero_grad()
        x, y = batch(rank, step)
        loss_of(local, x, y).backward()
        inner.step()
        if (step + 1) % H == 0:
            for n in SHAPES:
                delta = (glob[n] - local[n]).detach()
                dist.all_reduce(delta, group=group)
                glob[n].grad = delta / WORLD
            outer.step()
            with torch.no_grad():
                for n in SHAPES:
                    local[n].copy_(glob[n])
    return local


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD)
    comm = loco.TorchDistributed()

    # ---- DiLoCo against the reference --------------------------------------------------------
    params = model_params(rank)
    stale = loss_of(params, *batch(rank, 0))  # a graph of this rank's own initial values
    opt = loco.DiLoCo(params.items(), comm,
                      inner=loco.AdamW(lr=INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                                       weight_decay=0.1),
                      outer=loco.Nesterov(**OUTER), schedule=loco.Every(H))
    # start() wrote rank 0's values into rank 1's parameters: backward() through the graph
    # built before raises there, as after any in-place write (rank 0's values did not change).
    if rank == 1:
        try:
            stale.backward()
            raise AssertionError("rank 1: backward() through the graph built before start() "
                                 "did not raise")
        except RuntimeError as e:
            check("modified by an inplace operation" in str(e), str(e))
    del stale
    train(opt, params, rank, 0, H * 3)
    saved_state = opt.state_dict()
    saved_params = {n: p.detach().clone() for n, p in params.items()}
    train(opt, params, rank, H * 3, H * ROUNDS)
    ref = reference(rank)
    diff = max((params[n] - ref[n]).abs().max().item() for n in SHAPES)
    check(diff < 1e-5, f"rank {rank}: loco and the PyTorch DiLoCo differ by {diff}")
    moved = max((params[n] - initial_values(0)[n]).abs().max().item() for n in SHAPES)
    check(moved > 1e-2, f"rank {rank}: the parameters barely moved ({moved})")
    check(opt.outer_steps == ROUNDS and opt.inner_steps == H * ROUNDS, "step counters")

    # Bytes: the start (fingerprint; rank 0 broadcasts its parameters) and 5 syncs.
    total = sum(p.numel() for p in params.values())
    expected = opt._impl.fingerprint_bytes + (4 * total if rank == 0 else 0) \
        + ROUNDS * opt.bytes_per_sync
    check(opt.bytes_sent == expected, f"rank {rank}: sent {opt.bytes_sent} bytes, "
                                      f"expected {expected}")
    check(opt.bytes_per_sync > 4 * total // 2, "bytes per sync")

    # ---- state_dict(): a fresh handle resumed from round 3 ends where the run ended ------------
    ended = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved_params[n])
    resumed = loco.DiLoCo(params.items(), comm,
                          inner=loco.AdamW(lr=INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                                           weight_decay=0.1),
                          outer=loco.Nesterov(**OUTER), schedule=loco.Every(H), start=False)
    resumed.load_state_dict(saved_state)
    train(resumed, params, rank, H * 3, H * ROUNDS)
    for n in SHAPES:
        check(torch.equal(params[n].detach(), ended[n]), f"rank {rank}: resumed run differs")

    # ---- Streaming DiLoCo and MuLoCo run over torch.distributed; ranks agree after sync()  ------
    for kind in ("streaming", "muloco"):
        ps = model_params(rank)
        if kind == "streaming":
            o = loco.DiLoCo(ps.items(), comm, inner=loco.AdamW(lr=1e-2), outer=loco.Nesterov(),
                            schedule=loco.Streaming(every=4, fragments=2, overlap=1, alpha=0.5))
            check(o.fragments == 2, "two fragments")
        else:
            o = loco.DiLoCo(ps.items(), comm,
                            inner=loco.MuonAdamW(loco.Muon(lr=0.02, momentum=0.9),
                                                 loco.AdamW(lr=1e-2)),
                            outer=loco.Nesterov(), compressor=loco.TwoBit(),
                            schedule=loco.Every(4),
                            roles={"w1": "matrix", "w2": "head", "b1": "vector", "b2": "vector"})
            check(o.bytes_per_sync < opt.bytes_per_sync / 2,
                  f"2-bit: {o.bytes_per_sync} bytes per sync, fp32: {opt.bytes_per_sync}")
        train(o, ps, rank, 0, 12)
        check(o.outer_steps >= 2, f"{kind}: {o.outer_steps} outer steps")
        o.sync()
        # The global parameters agree (the local ones too for DiLoCo; Streaming DiLoCo merges
        # each worker's own values into them with weight alpha).
        mine = o.global_params()
        other = [torch.zeros_like(mine) for _ in range(WORLD)]
        dist.all_gather(other, mine)
        check(torch.equal(other[0], other[1]), f"{kind}: ranks differ after sync()")

    # ---- start=False: the first step() starts the run; on rank 1 it writes rank 0's values -----
    # (no inner update), and the version counters are bumped there too, so that backward()
    # through a graph of the old values raises on every rank. Rank 1's gradient may even be
    # non-finite (a step that applies nothing): it still receives rank 0's values.
    for grad in (0.1, float("nan")):
        ps = model_params(rank)
        o = loco.DiLoCo(ps.items(), comm, inner=loco.AdamW(), outer=loco.Nesterov(),
                        schedule=loco.Every(H), start=False)
        x, y = batch(rank, 0)
        loss = loss_of(ps, x, y)
        for p in ps.values():
            p.grad.fill_(grad if rank == 1 else 0.1)
        applied, _ = o.step()
        check(applied == (rank == 0), f"rank {rank}: first step applied = {applied}")
        check(torch.equal(ps["w1"].detach(), model_params(0)["w1"].detach()) == (rank == 1),
              f"rank {rank}, gradient {grad}: rank 0's parameters")
        try:
            loss.backward()
            raise AssertionError(f"rank {rank}, gradient {grad}: backward() through the old "
                                 "graph did not raise")
        except RuntimeError as e:
            check("modified by an inplace operation" in str(e), str(e))

    # ---- a rank built with another broadcast_initial: start() refuses on both, at once ----------
    ps = model_params(rank)
    try:
        loco.DiLoCo(ps.items(), comm, inner=loco.AdamW(), outer=loco.Nesterov(),
                    schedule=loco.Every(H), broadcast_initial=(rank == 0))
        raise AssertionError(f"rank {rank}: different broadcast_initial was accepted")
    except loco.InvalidArgument as e:
        check("broadcast_initial" in str(e), str(e))

    # ---- parameter lists that differ between processes: both fail, nothing changes -------------
    ps = model_params(rank)
    if rank == 1:
        ps["extra"] = torch.nn.Parameter(torch.zeros(2))
        ps["extra"].grad = torch.zeros(2)
    before = {n: p.detach().clone() for n, p in ps.items()}
    try:
        loco.DiLoCo(ps.items(), comm, inner=loco.AdamW(), outer=loco.Nesterov(),
                    schedule=loco.Every(H))
        raise AssertionError(f"rank {rank}: differing parameter lists were accepted")
    except loco.InvalidArgument as e:
        msg = str(e)
        check(msg.startswith("loco::diloco: the ranks were built differently"), msg)
        check(msg.count(". ") == 0, f"more than one sentence: {msg}")
    for n, p in ps.items():
        check(torch.equal(p.detach(), before[n]), f"rank {rank}: '{n}' changed")
    dist.barrier()
    dist.destroy_process_group()


class GlooDiLoCo(unittest.TestCase):
    def test_two_processes(self):
        print(f"test_diloco_gloo: seed {SEED} (LOCO_TEST_SEED={SEED} repeats this run)")
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(worker, args=(os.path.join(d, "rendezvous"),), nprocs=WORLD, join=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
