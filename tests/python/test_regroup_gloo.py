"""loco.DiLoCo.regroup() over torch.distributed (three gloo processes) against DiLoCo's outer step
written in plain PyTorch.

One run goes through the failures of docs/reliability.md, each followed by its recovery:
1. three workers sync twice;
2. worker 2 is lost: the survivors regroup onto a process group of their own (keeping their
   parameters, mid-round) and sync twice;
3. worker 2 comes back as a newcomer (a DiLoCo built with start=False, other parameters): a regroup
   from the newcomer as donor and one from a rank that is not in the group are refused on every
   rank, nothing changed; the regroup from rank 0 heals it (its parameters become the global ones,
   bit for bit, and a graph built before the heal raises in backward()), and the three sync twice;
4. a collective fails on one rank only (a callback raising before its collective, on a group with
   a 2 s timeout): every rank raises CommError and nothing is applied; every rank regroups onto a
   fresh group and the same sync goes through;
5. a KeyboardInterrupt in regroup()'s first collective on one rank reaches that rank as itself
   (CommError on the others), no rank moves to the group, and a regroup onto a fresh one works;
6. a group without global rank 0 ({1, 2}): a fresh DiLoCo's start() gives both members the
   parameters of the group's rank 0, global rank 1.
The reference, in every process: the global parameters take one torch.optim.SGD(nesterov=True)
step per sync with global - mean(local of the workers in the group) as their gradient, the locals
gathered over the default group just before each sync. loco's global parameters must agree within
1e-5 after every sync, and each worker's parameters must equal them.
"""

import datetime
import os
import random
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loco
from test_comm_failure_gloo import Backend as Failing  # arm(e): the next callback raises e

SEED = int(os.environ.get("LOCO_TEST_SEED", random.randrange(2**31)))
os.environ["LOCO_TEST_SEED"] = str(SEED)  # the spawned workers import this file again
WORLD = 3
SHAPES = {"w": (8, 5), "b": (8,), "v": (3,)}
OUTER = dict(lr=0.7, momentum=0.9)
SHORT = datetime.timedelta(seconds=2)  # the failing group's timeout


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def group_of(ranks, rank, timeout=None):
    """A gloo group of `ranks` (new_group is collective over every process) and, on its members,
    loco's communicator over it."""
    dist.barrier()
    kwargs = {"timeout": timeout} if timeout is not None else {}
    group = dist.new_group(ranks=ranks, backend="gloo", **kwargs)
    return loco.TorchDistributed(group) if rank in ranks else None


def model(rank, salt):
    gen = torch.Generator().manual_seed(SEED * 11 + 100 * salt + rank)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    return params


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def build(params, comm, start=True):
    return loco.DiLoCo(params.items(), comm, inner=loco.AdamW(lr=0.01),
                       outer=loco.Nesterov(**OUTER), schedule=loco.Every(1000), start=start)


class Reference:
    """DiLoCo's outer step in plain PyTorch, identical in every process."""

    def __init__(self, initial):
        self.global_ = initial.clone()
        self.opt = torch.optim.SGD([self.global_], nesterov=True, **OUTER)

    def gather(self, local):
        """Every process's local parameters (zeros from one outside the group)."""
        every = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(every, local)
        return every

    def sync(self, every, members):
        mean = torch.stack([every[r] for r in members]).mean(dim=0)
        with torch.no_grad():
            self.global_.grad = self.global_ - mean
        self.opt.step()


def inner_steps(opt, params, rank, count):
    gen = torch.Generator().manual_seed(SEED * 17 + rank * 1000 + opt.inner_steps)
    for _ in range(count):
        opt.zero_grad()
        for p in params.values():
            p.grad.copy_(torch.randn(p.shape, generator=gen) + 0.3 * rank)
        applied, synced = opt.step()
        check(applied and not synced, f"rank {rank}: step() returned {applied, synced}")


def synced_round(rank, members, opt, params, ref, what):
    """Two inner steps on every member, then one sync, checked against the reference."""
    if rank in members:
        inner_steps(opt, params, rank, 2)
        local = flat(params)
    else:
        local = torch.zeros(ref.global_.numel())
    every = ref.gather(local)
    ref.sync(every, members)
    if rank in members:
        opt.sync()
        g = opt.global_params()
        err = (g - ref.global_.detach()).abs().max().item()
        check(err <= 1e-5, f"rank {rank}, {what}: loco's global parameters differ from the "
                           f"reference by {err}")
        check(torch.equal(flat(params), g), f"rank {rank}, {what}: the worker's parameters are "
                                            "not the global ones after the sync")


def same_on_members(rank, members, value, what):
    """value (a float tensor) is equal, bit for bit, on every member."""
    every = [torch.empty_like(value) for _ in range(WORLD)]
    dist.all_gather(every, value)
    for r in members:
        check(torch.equal(every[r], every[members[0]]),
              f"rank {rank}, {what}: rank {r} differs from rank {members[0]}")


def refused(rank, call, error, words, what):
    try:
        call()
    except error as e:
        check(words in str(e), f"rank {rank}, {what}: {e}")
        return
    raise AssertionError(f"rank {rank}, {what}: not refused")


def worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    everyone = list(range(WORLD))

    # 1. Three workers, rank 0's parameters for all.
    comm = group_of(everyone, rank)
    params = model(rank, 0)
    ref = Reference(flat(model(0, 0)))
    opt = build(params, comm)
    for i in range(2):
        synced_round(rank, everyone, opt, params, ref, f"three workers, sync {i}")

    # 2. Worker 2 is lost; the survivors go on mid-round with their own parameters.
    survivors = [0, 1]
    comm = group_of(survivors, rank)
    if rank in survivors:
        inner_steps(opt, params, rank, 1)
        before = flat(params)
        outer = opt.outer_steps
        opt.regroup(comm)
        check(torch.equal(flat(params), before), f"rank {rank}: a survivor's parameters changed")
        check(opt.outer_steps == outer and opt.comm is comm,
              f"rank {rank}: outer_steps {opt.outer_steps}, comm replaced: {opt.comm is comm}")
    for i in range(2):
        synced_round(rank, survivors, opt if rank in survivors else None, params, ref,
                     f"two survivors, sync {i}")

    # 3. Worker 2 comes back as a newcomer, other parameters, and is healed from rank 0.
    comm = group_of(everyone, rank)
    if rank == 2:
        del opt
        params = model(rank, 1)
        opt = build(params, comm, start=False)
    before = flat(params)
    refused(rank, lambda: opt.regroup(comm, donor=2), loco.InvalidArgument,
            "a worker that never started", "regroup from the newcomer")
    refused(rank, lambda: opt.regroup(comm, donor=3), loco.InvalidArgument,
            "the donor rank 3 is not a rank", "regroup from rank 3 of 3")
    refused(rank, lambda: opt.regroup(comm, donor="0"), loco.InvalidArgument,
            "donor must be a rank", "a donor that is not an int")
    refused(rank, lambda: opt.regroup(comm, donor=2**31), loco.InvalidArgument,
            "the donor rank 2147483648 is not a rank", "a donor beyond an int")
    check(torch.equal(flat(params), before), f"rank {rank}: a refused regroup changed parameters")
    stale = (params["w"] * params["w"]).sum()  # a graph of the newcomer's own values
    opt.regroup(comm)
    if rank == 2:
        check(torch.equal(flat(params), opt.global_params()),
              f"rank 2: the newcomer's parameters are not the global ones")
        # The heal wrote the newcomer's parameters in place: backward() through the graph
        # built before raises, as after torch's own in-place writes.
        try:
            stale.backward()
            raise AssertionError("rank 2: backward() through a graph built before the heal "
                                 "did not raise")
        except RuntimeError as e:
            check("modified by an inplace operation" in str(e), f"rank 2: {e}")
        err = (flat(params) - ref.global_.detach()).abs().max().item()
        check(err <= 1e-5, f"rank 2: healed parameters differ from the reference by {err}")
    del stale
    same_on_members(rank, everyone, opt.global_params(), "global parameters after the heal")
    same_on_members(rank, everyone, torch.tensor([float(opt.outer_steps)]), "outer steps")
    for i in range(2):
        synced_round(rank, everyone, opt, params, ref, f"after the heal, sync {i}")

    # 4. A collective fails on rank 1 only: nothing applied anywhere; a fresh group goes on.
    dist.barrier()
    backend = Failing(dist.new_group(ranks=everyone, backend="gloo", timeout=SHORT))
    failing = loco._loco.PythonCommunicator(backend, rank, WORLD, "torch_distributed")
    opt.regroup(failing)
    inner_steps(opt, params, rank, 2)
    before, glob, outer = flat(params), opt.global_params(), opt.outer_steps
    if rank == 1:
        backend.arm(RuntimeError("injected before the collective"))
    refused(rank, opt.sync, loco.CommError, "", "the sync with a failed collective")
    check(torch.equal(flat(params), before) and torch.equal(opt.global_params(), glob)
          and opt.outer_steps == outer, f"rank {rank}: the failed sync changed something")
    comm = group_of(everyone, rank)
    opt.regroup(comm)
    check(torch.equal(flat(params), before), f"rank {rank}: regroup changed a survivor's params")
    every = ref.gather(flat(params))
    ref.sync(every, everyone)
    opt.sync()
    err = (opt.global_params() - ref.global_.detach()).abs().max().item()
    check(err <= 1e-5, f"rank {rank}, after the failure: differs from the reference by {err}")
    check(torch.equal(flat(params), opt.global_params()), f"rank {rank}: params not global")

    # 5. A KeyboardInterrupt in regroup()'s first collective on rank 0 reaches rank 0 as itself
    # (the new group's interrupt), the others get CommError; no rank moved; a fresh group works.
    dist.barrier()
    backend = Failing(dist.new_group(ranks=everyone, backend="gloo", timeout=SHORT))
    interrupted = loco._loco.PythonCommunicator(backend, rank, WORLD, "torch_distributed")
    if rank == 0:
        backend.arm(KeyboardInterrupt())
    inner_steps(opt, params, rank, 1)
    before, old = flat(params), opt.comm
    try:
        opt.regroup(interrupted)
        raise AssertionError(f"rank {rank}: the interrupted regroup() returned")
    except KeyboardInterrupt:
        check(rank == 0, f"rank {rank}: KeyboardInterrupt on a rank that did not raise it")
    except loco.CommError:
        check(rank != 0, "rank 0: CommError instead of its KeyboardInterrupt")
    check(opt.comm is old and torch.equal(flat(params), before),
          f"rank {rank}: the failed regroup() changed the handle")
    comm = group_of(everyone, rank)
    opt.regroup(comm)
    synced_round(rank, everyone, opt, params, ref, "after the interrupted regroup")

    # 6. A group of global ranks 1 and 2: loco's root of start()'s broadcast is the group's rank
    # 0, which torch.distributed addresses by its global rank, 1 (global rank 0 is not in it).
    pair = [1, 2]
    comm = group_of(pair, rank, timeout=SHORT)
    if rank in pair:
        fresh = model(rank, 2)
        build(fresh, comm)
        check(torch.equal(flat(fresh), flat(model(1, 2))),
              f"rank {rank}: start() on the group {{1, 2}} did not give global rank 1's values")
    dist.barrier()


class Regroup(unittest.TestCase):
    def test_lost_worker_newcomer_and_failed_collective(self):
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(worker, args=(os.path.join(d, "rendezvous"),), nprocs=WORLD, join=True)


if __name__ == "__main__":
    print(f"LOCO_TEST_SEED={SEED}")
    unittest.main(verbosity=2)
