"""A torch.distributed callback that fails on one rank (two gloo processes, a 2 s gloo timeout).

The communicator of loco.TorchDistributed() calls back into Python for every collective. A
callback can fail before it issues its torch.distributed call (a KeyboardInterrupt, a MemoryError
in a copy, a CUDA error while synchronising): the peers then wait in a collective this rank never
joined, and this rank's next collective (diloco's one-float agreement) must not be paired with it
(gloo returned garbage where the sizes matched and aborted the process where they did not). So a
failed callback breaks the communicator on its rank: every later collective raises CommError at
once without calling Python, and the peers time out. Checked here:

- a callback that raises before its collective: both ranks raise CommError for that sync(), with
  nothing applied (parameters, global parameters, outer steps as before), no process aborted, and
  the failed rank's next call raises at once without calling Python; with the one-float model whose
  payload matches the agreement's size, and with a larger one;
- KeyboardInterrupt (after the collective completed, or before it was issued) and SystemExit (in
  start()) reach the caller as themselves, not as loco.CommError; the peer raises CommError.

Each case runs on a process group of its own (dist.new_group), the ranks meeting on the default
group between cases.
"""

import datetime
import os
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loco

WORLD = 2
TIMEOUT = datetime.timedelta(seconds=2)  # the gloo timeout of each case's group


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Backend(loco._TorchCollectives):
    """torch.distributed as loco.TorchDistributed() calls it, counting the calls; arm(e) makes the
    next call raise e, before its collective or (after=True) once it has completed."""

    def __init__(self, group):
        super().__init__(group)
        self.calls = 0
        self.plan = None

    def arm(self, error, after=False):
        self.plan = (error, after)

    def _run(self, name, *args):
        self.calls += 1
        plan, self.plan = self.plan, None
        if plan is not None and not plan[1]:
            raise plan[0]
        getattr(super(), name)(*args)
        if plan is not None:
            raise plan[0]

    def all_reduce(self, capsule, mean):
        self._run("all_reduce", capsule, mean)

    def all_gather(self, send, recv):
        self._run("all_gather", send, recv)

    def all_to_all(self, send, recv):
        self._run("all_to_all", send, recv)

    def broadcast(self, capsule, root):
        self._run("broadcast", capsule, root)

    def barrier(self):
        self._run("barrier")


def fresh_group(rank):
    """A gloo group of both ranks with the short timeout, and loco's communicator over it."""
    dist.barrier()  # the previous case is over on both ranks (its group timed out)
    group = dist.new_group(ranks=list(range(WORLD)), timeout=TIMEOUT, backend="gloo")
    backend = Backend(group)
    return backend, loco._loco.PythonCommunicator(backend, rank, WORLD, "torch_distributed")


def model(shapes):
    ps = {}
    for i, (n, s) in enumerate(shapes.items()):
        ps[n] = torch.nn.Parameter(torch.linspace(-1.0, 1.0, s[0]) + i)
        ps[n].grad = torch.full(s, 0.1)
    return ps


def snapshot(opt, ps):
    return ({n: p.detach().clone() for n, p in ps.items()}, opt.global_params(), opt.outer_steps)


def check_unchanged(rank, opt, ps, before, what):
    values, glob, outer = before
    for n, p in ps.items():
        check(torch.equal(p.detach(), values[n]), f"rank {rank}, {what}: '{n}' changed")
    check(torch.equal(opt.global_params(), glob), f"rank {rank}, {what}: the global params changed")
    check(opt.outer_steps == outer, f"rank {rank}, {what}: outer_steps {opt.outer_steps}")


def check_refused(rank, opt, backend, what):
    """The communicator is broken: another collective raises at once, without calling Python."""
    calls = backend.calls
    try:
        opt.sync()
        raise AssertionError(f"rank {rank}, {what}: a sync after the failure went through")
    except loco.CommError as e:
        msg = str(e)
        check("an earlier all_reduce failed on this rank" in msg
              and "refuses further collectives" in msg, f"rank {rank}, {what}: {msg}")
    check(backend.calls == calls, f"rank {rank}, {what}: Python was called after the failure")


def fail_before(rank, shapes, error, what):
    """Rank 0's payload all-reduce raises before issuing its collective, in sync()."""
    backend, comm = fresh_group(rank)
    ps = model(shapes)
    opt = loco.DiLoCo(ps.items(), comm, inner=loco.AdamW(lr=0.1, weight_decay=0.0),
                      outer=loco.Nesterov(lr=1.0, momentum=0.0), schedule=loco.Every(100))
    opt.step()
    with torch.no_grad():  # the workers' values differ: an applied average would show
        for p in ps.values():
            p.add_(float(rank + 1))
    before = snapshot(opt, ps)
    if rank == 0:
        backend.arm(error)
    calls = backend.calls
    try:
        opt.sync()
        raise AssertionError(f"rank {rank}, {what}: sync() returned")
    except loco.CommError as e:
        msg = str(e)
        if rank == 0:
            check(type(error).__name__ in msg and "an earlier all_reduce failed on this rank" in msg,
                  f"rank 0, {what}: {msg}")
            check(backend.calls == calls + 1,
                  f"rank 0, {what}: {backend.calls - calls} callbacks, not 1 (the failed one)")
    check_unchanged(rank, opt, ps, before, what)
    check_refused(rank, opt, backend, what)
    check_unchanged(rank, opt, ps, before, what)


def interrupted(rank, error, after, call, what):
    """Rank 0's first collective of `call` raises `error` (a BaseException that is not an
    Exception): rank 0 sees it as itself, rank 1 gets CommError."""
    backend, comm = fresh_group(rank)
    ps = model({"w": (64,), "b": (8,)})
    opt = loco.DiLoCo(ps.items(), comm, schedule=loco.Every(2), start=call != "start")
    if call == "step":
        opt.step()  # the second call syncs
    before = snapshot(opt, ps)
    if rank == 0:
        backend.arm(error, after=after)
    try:
        getattr(opt, call)()
        raise AssertionError(f"rank {rank}, {what}: {call}() returned")
    except type(error):
        check(rank == 0, f"rank {rank}, {what}: {type(error).__name__} on the rank that did not "
                         "raise it")
    except loco.CommError as e:
        check(rank == 1, f"rank {rank}, {what}: CommError instead of {type(error).__name__}: {e}")
    if call == "sync":
        check_unchanged(rank, opt, ps, before, what)
    else:
        check(opt.outer_steps == 0, f"rank {rank}, {what}: outer_steps {opt.outer_steps}")
    if call != "start":
        check_refused(rank, opt, backend, what)


def worker(rank, init_file, case):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    if case == "before":
        # One float: the payload has the agreement's size (gloo paired them: silent divergence).
        fail_before(rank, {"s": (1,)}, RuntimeError("injected before the collective"),
                    "one float")
        # 72 floats (gloo aborted the process: "op.preamble.length <= op.nbytes. 72 vs 4").
        fail_before(rank, {"w": (64,), "b": (8,)}, MemoryError("injected in s.clone()"),
                    "72 floats")
    else:
        interrupted(rank, KeyboardInterrupt(), True, "step",
                    "KeyboardInterrupt after the collective, in step()")
        interrupted(rank, KeyboardInterrupt(), False, "sync",
                    "KeyboardInterrupt before the collective, in sync()")
        interrupted(rank, SystemExit(3), False, "start", "SystemExit in start()")
    dist.barrier()


def run(case):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(os.path.join(d, "rendezvous"), case), nprocs=WORLD, join=True)


class CallbackFailure(unittest.TestCase):
    def test_failure_before_the_collective(self):
        run("before")

    def test_interrupts_reach_the_caller(self):
        run("interrupts")


if __name__ == "__main__":
    unittest.main(verbosity=2)
