"""loco's handles among torch's own machinery: tensors without elements, autograd's version
counters, zero_grad(), and Python threads.

- An empty matrix (torch exports torch.empty(0, 3) with strides [1, 1]) is a parameter like any
  other: step(), sync() and a state_dict() resume run over it.
- loco writes parameters in place behind autograd's back; after a call that wrote them, each
  parameter's version counter is bumped, so that backward() through a graph built before the
  step raises as it does after torch.optim's step, instead of using the overwritten values: a
  step whose inner update was skipped but which synced, and one interrupted in its sync after
  the inner update, included.
- zero_grad() leaves zeros where the gradients held NaN or inf, as torch's does.
- Two threads calling one handle take turns (python/bound.hpp, `locked`): the calls all count,
  and the parameters end as after the same calls from one thread.
- Other Python threads run while two_bit_round_trip and the constructors do their C++ work.
- A call from another thread queued behind regroup() runs on the new communicator and raises its
  interrupts; the old communicator is let go.
"""

import gc
import sys
import threading
import time
import unittest
import weakref

import torch

import loco
from random_params import params


class EmptyTensors(unittest.TestCase):
    def test_empty_matrices_step_sync_and_resume(self):
        torch.manual_seed(0)
        shapes = dict(rows0=(0, 3), cols0=(3, 0), flat0=(0,), w=(2, 3))
        for build in (lambda ps, start=True: loco.DiLoCo(ps, loco.Single(),
                                                         schedule=loco.Every(2), start=start),
                      lambda ps, start=True: loco.DiLoCo(ps, loco.Single(),
                                                         inner=loco.MuonAdamW(),
                                                         compressor=loco.TwoBit(),
                                                         roles={"w": "matrix"},
                                                         schedule=loco.Every(2), start=start)):
            ps = params(**shapes)
            opt = build(ps)
            for _ in range(3):
                self.assertTrue(opt.step()[0])
            opt.sync()
            self.assertEqual(opt.outer_steps, 2)
            state = opt.state_dict()
            # A fresh handle resumes bit for bit, the empty tensors included.
            copy = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in ps]
            for (_, c), (_, p) in zip(copy, ps):
                c.grad = p.grad.clone()
            resumed = build(copy, start=False)
            resumed.load_state_dict(state)
            opt.step()
            resumed.step()
            for (n, c), (_, p) in zip(copy, ps):
                self.assertEqual(c.shape, p.shape)
                self.assertTrue(torch.equal(c.detach(), p.detach()), n)

        ps = params(**shapes)
        opt = loco.Optimizer(ps, loco.AdamW())
        self.assertTrue(opt.step())
        self.assertEqual(opt.steps, 1)


class VersionCounter(unittest.TestCase):
    STALE = "modified by an inplace operation"

    def test_a_step_between_forward_and_backward_raises_as_torch_optim(self):
        for name, build in (
                ("torch.optim.SGD", lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.5)),
                ("loco.Optimizer", lambda ps: loco.Optimizer(ps, loco.SGD(lr=0.5))),
                ("loco.DiLoCo", lambda ps: loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(),
                                                       schedule=loco.Every(10)))):
            with self.subTest(name):
                w = torch.nn.Parameter(torch.ones(3))
                s = torch.nn.Parameter(torch.tensor(2.0))  # 0-dim
                e = torch.nn.Parameter(torch.empty(0, 3))  # no element
                ps = [("w", w), ("s", s), ("e", e)]
                for _, p in ps:
                    p.grad = torch.zeros_like(p)
                opt = build(ps)
                y = (w * w).sum() + s * s  # saves w and s for backward
                for _, p in ps:
                    p.grad.fill_(1.0)
                versions = [p._version for _, p in ps]
                opt.step()
                self.assertTrue(all(p._version > v for (_, p), v in zip(ps, versions)))
                with self.assertRaisesRegex(RuntimeError, self.STALE):
                    y.backward()

    def test_sync_bumps_and_the_ordinary_loop_is_untouched(self):
        w = torch.nn.Parameter(torch.ones(4))
        w.grad = torch.zeros(4)
        opt = loco.DiLoCo([("w", w)], loco.Single(), schedule=loco.Every(100))
        for _ in range(3):  # forward, backward, step: nothing stale
            opt.zero_grad()
            (w * w).sum().backward()
            opt.step()
        y = (w * w).sum()
        opt.sync()
        with self.assertRaisesRegex(RuntimeError, self.STALE):
            y.backward()

    @staticmethod
    def streaming_pair(**kw):
        """Two parameters of 4 ones with gradients of 0.5, a fragment each: Streaming H = 4,
        P = 2, tau = 1 on one worker."""
        ps = []
        for name in ("w", "u"):
            p = torch.nn.Parameter(torch.ones(4))
            p.grad = torch.full((4,), 0.5)
            ps.append((name, p))
        return ps, loco.DiLoCo(ps, loco.Single(), **kw,
                               schedule=loco.Streaming(every=4, fragments=2, overlap=1))

    def test_flush_applies_only_what_is_in_flight_and_bumps(self):
        # Streaming, H = 4, P = 2, tau = 1: fragment 0's exchange starts at call 1 (due at call
        # 2). flush() applies it (one outer step; sync() would add one per fragment); call 2 then
        # has nothing to finish, and fragment 1 goes on as planned (start 3, apply 4).
        ps, opt = self.streaming_pair()
        opt.step()
        w = ps[0][1]
        y = (w * w).sum()
        opt.flush()
        self.assertEqual(opt.outer_steps, 1)
        with self.assertRaisesRegex(RuntimeError, self.STALE):
            y.backward()
        opt.step()
        self.assertEqual(opt.outer_steps, 1)
        opt.step()
        opt.step()
        self.assertEqual(opt.outer_steps, 2)

    def test_a_call_that_wrote_and_then_raised_still_bumps(self):
        # sync() applies fragment 0 (w), then fragment 1's non-finite average raises: w changed,
        # so a graph built before must raise in backward() (it used w's new values silently).
        ps, opt = self.streaming_pair(on_nonfinite="raise")
        opt.step()
        w, u = ps[0][1], ps[1][1]
        with torch.no_grad():
            u[0] = float("inf")
        before = w.detach().clone()
        y = (w * w).sum()
        with self.assertRaises(loco.NonfiniteError):
            opt.sync()
        self.assertFalse(torch.equal(w.detach(), before))
        with self.assertRaisesRegex(RuntimeError, self.STALE):
            y.backward()

    def test_a_step_that_only_synced_bumps(self):
        # A non-finite gradient skips the inner update (applied False), but the sync the
        # schedule plans still runs and writes the global values: step() returns (False, True)
        # and a graph built before it raises.
        w = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
        w.grad = torch.full((4,), 0.5)
        opt = loco.DiLoCo([("w", w)], loco.Single(), inner=loco.AdamW(lr=0.1),
                          schedule=loco.Every(2))
        self.assertEqual(opt.step(), (True, False))
        w.grad.fill_(float("nan"))
        before = w.detach().clone()
        y = (w * w).sum()
        self.assertEqual(opt.step(), (False, True))
        self.assertFalse(torch.equal(w.detach(), before))
        with self.assertRaisesRegex(RuntimeError, self.STALE):
            y.backward()

    def test_an_interrupted_sync_after_the_inner_step_bumps(self):
        # A KeyboardInterrupt raised in the sync's collective (a BaseException, not an
        # Exception) after the inner update was applied: the parameters changed, so a graph
        # built before the step raises in backward() all the same.
        w = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
        w.grad = torch.full((4,), 0.5)
        backend = Mirror()
        opt = loco.DiLoCo([("w", w)], loco._loco.PythonCommunicator(backend, 0, 2, "mirror"),
                          inner=loco.AdamW(lr=0.1), schedule=loco.Every(2))
        self.assertEqual(opt.step(), (True, False))
        backend.raise_in["all_reduce"] = (KeyboardInterrupt(), threading.current_thread())
        before = w.detach().clone()
        y = (w * w).sum()
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        self.assertFalse(torch.equal(w.detach(), before))
        with self.assertRaisesRegex(RuntimeError, self.STALE):
            y.backward()

    def test_a_skipped_step_writes_nothing_and_bumps_nothing(self):
        w = torch.nn.Parameter(torch.ones(3))
        w.grad = torch.full((3,), float("nan"))
        opt = loco.Optimizer([("w", w)], loco.SGD(lr=0.5))
        version = w._version
        self.assertFalse(opt.step())
        self.assertEqual(w._version, version)


class ZeroGrad(unittest.TestCase):
    def test_zero_grad_clears_non_finite_gradients(self):
        # zero_grad() sets the bound gradients to 0 in place, as torch's zero_grad does: a NaN
        # or inf left by a bad batch must not survive (a multiplication by 0 keeps NaN, and inf
        # * 0 is NaN), or every later step would be skipped as non-finite.
        for build in (lambda ps: loco.Optimizer(ps, loco.SGD(lr=0.1)),
                      lambda ps: loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2))):
            ps = params(w=(3, 2), b=(4,))
            opt = build(ps)
            grads = [p.grad for _, p in ps]
            ps[0][1].grad[0, 1] = float("nan")
            ps[1][1].grad[2] = float("inf")
            ps[1][1].grad[3] = -float("inf")
            opt.zero_grad()
            for (_, p), g in zip(ps, grads):
                self.assertIs(p.grad, g)
                self.assertTrue(torch.equal(g, torch.zeros_like(g)))


class Threads(unittest.TestCase):
    CALLS = 60

    def run_threads(self, target, count=2, others=()):
        """target in `count` threads and each of `others` in one more, all at once; an exception
        in any of them fails the test (a bare threading.Thread would only print it)."""
        errors = []

        def run(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=run, args=(fn,))
                   for fn in [target] * count + list(others)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_two_threads_stepping_one_handle_take_turns(self):
        n = 1 << 18

        def model():
            out = []
            for name in ("w", "v"):
                p = torch.nn.Parameter(torch.zeros(n))
                p.grad = torch.full((n,), 1e-3)
                out.append((name, p))
            return out

        def build(ps):
            return loco.DiLoCo(ps, loco.Single(),
                               schedule=loco.Streaming(every=4, fragments=2, overlap=1))

        ps, ref_ps = model(), model()
        opt, ref = build(ps), build(ref_ps)

        def steps():
            for _ in range(self.CALLS):
                opt.step()

        def reads():  # the properties and the checkpoint from a third thread, meanwhile
            for _ in range(self.CALLS):
                self.assertLessEqual(opt.inner_steps, 2 * self.CALLS)
                opt.state_dict()

        self.run_threads(steps, others=[reads])
        self.assertEqual(opt.calls, 2 * self.CALLS)
        for _ in range(2 * self.CALLS):
            ref.step()
        self.assertEqual(opt.state_dict(), ref.state_dict())
        for (_, p), (_, q) in zip(ps, ref_ps):
            self.assertTrue(torch.equal(p.detach(), q.detach()))

    def test_threads_syncing_through_python_do_not_deadlock(self):
        # A sync calls back into Python (the communicator of loco.TorchDistributed) under the
        # handle's lock, taking the GIL there while the other threads wait for the lock.
        class TwoIdenticalWorkers:  # each collective's result is what this worker holds
            def all_reduce(self, capsule, mean):
                t = torch.utils.dlpack.from_dlpack(capsule)
                time.sleep(1e-3)
                if not mean:
                    t.mul_(2)

            def all_gather(self, send, recv):
                s = torch.utils.dlpack.from_dlpack(send)
                torch.utils.dlpack.from_dlpack(recv).view(2, -1).copy_(s.view(1, -1))
                time.sleep(1e-3)

            def broadcast(self, capsule, root):
                time.sleep(1e-3)

            def barrier(self):
                time.sleep(1e-3)

        comm = loco._loco.PythonCommunicator(TwoIdenticalWorkers(), 0, 2, "two_identical")
        p = torch.nn.Parameter(torch.zeros(1000))
        p.grad = torch.full_like(p, 1e-3)
        opt = loco.DiLoCo([("p", p)], comm, schedule=loco.Every(2))

        def steps():
            for _ in range(20):
                opt.step()
                self.assertLessEqual(opt.outer_steps, 30)

        self.run_threads(steps, count=3)
        self.assertEqual(opt.calls, 60)
        self.assertEqual(opt.outer_steps, 30)

    def test_two_threads_on_a_bare_optimizer(self):
        def model():
            p = torch.nn.Parameter(torch.zeros(1 << 18))
            p.grad = torch.full_like(p, 1e-3)
            return p

        p, q = model(), model()
        opt = loco.Optimizer([("p", p)], loco.AdamW())
        ref = loco.Optimizer([("p", q)], loco.AdamW())

        def steps():
            for _ in range(self.CALLS):
                opt.step()

        self.run_threads(steps)
        self.assertEqual(opt.steps, 2 * self.CALLS)
        for _ in range(2 * self.CALLS):
            ref.step()
        self.assertEqual(opt.state_dict(), ref.state_dict())
        self.assertTrue(torch.equal(p.detach(), q.detach()))

    def assert_releases_the_gil(self, call, attempts=50):
        """call() runs its C++ work without the GIL: a thread that counts (sleeping between counts,
        which lets the GIL go) advances while it runs. The switch interval is raised far above
        the calls' length, so while a call held the GIL the counter could not move at all; the
        call is repeated, since on a loaded machine the counter may miss one short call."""
        count, stop = [0], threading.Event()

        def counter():
            while not stop.is_set():
                count[0] += 1
                time.sleep(1e-4)

        interval = sys.getswitchinterval()
        thread = threading.Thread(target=counter)
        sys.setswitchinterval(100.0)
        try:
            thread.start()
            while count[0] == 0:
                time.sleep(1e-3)
            for _ in range(attempts):
                before = count[0]
                call()
                advanced = count[0] - before  # read before anything lets the GIL go
                if advanced:
                    break
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(interval)
        self.assertGreater(advanced, 0, "no other Python thread ran during the call")

    def test_two_bit_round_trip_and_constructors_release_the_gil(self):
        n = 1 << 20
        x = torch.randn(n)
        out = torch.empty(n)
        # The compiled calls on capsules made beforehand: the Python wrapper around them (its
        # checks, to_dlpack) may let the GIL go on its own.
        cx, cout = torch.utils.dlpack.to_dlpack(x), torch.utils.dlpack.to_dlpack(out)
        self.assert_releases_the_gil(lambda: loco._loco.two_bit_round_trip(cx, cout, 0, False, 6.0))
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        items = loco._items([("p", p)], None)[0]
        single = loco.Single()
        self.assert_releases_the_gil(lambda: loco._loco.DiLoCo_adamw_nesterov(items, single, {}))
        self.assert_releases_the_gil(lambda: loco._loco.Optimizer_adamw(items, {}))


class Mirror:
    """A torch.distributed stand-in for loco._loco.PythonCommunicator: rank 0 of two identical
    ranks (the peer sends what this rank sends). raise_in[name] = (error, thread) makes that
    callback raise in that thread; on_gather runs once, in the next all_gather."""

    def __init__(self):
        self.raise_in = {}
        self.on_gather = None

    def _maybe_raise(self, name):
        error, thread = self.raise_in.get(name, (None, None))
        if error is not None and threading.current_thread() is thread:
            raise error

    def all_reduce(self, capsule, mean):
        self._maybe_raise("all_reduce")
        if not mean:
            torch.utils.dlpack.from_dlpack(capsule).mul_(2)

    def all_gather(self, send, recv):
        if self.on_gather is not None:
            hook, self.on_gather = self.on_gather, None
            hook()
        self._maybe_raise("all_gather")
        s = torch.utils.dlpack.from_dlpack(send).clone()
        for chunk in torch.utils.dlpack.from_dlpack(recv).chunk(2):
            chunk.copy_(s)

    def all_to_all(self, send, recv):
        s = torch.utils.dlpack.from_dlpack(send).clone()
        for chunk in torch.utils.dlpack.from_dlpack(recv).chunk(2):
            chunk.copy_(s.chunk(2)[0])

    def broadcast(self, capsule, root):
        pass

    def barrier(self):
        pass


class Regroup(unittest.TestCase):
    def test_a_call_queued_behind_regroup_runs_on_the_new_group(self):
        """Another thread's sync() that waits for the handle while regroup() runs goes through
        the new communicator, and a KeyboardInterrupt in one of that communicator's callbacks
        reaches it as itself (python/bound.hpp reads the communicator under the handle's lock;
        it was read before, and the interrupt surfaced as CommError there and later from an
        unrelated step()). The old communicator object is let go once regroup() succeeded."""
        p = torch.nn.Parameter(torch.randn(6))
        p.grad = torch.zeros(6)
        old_backend = Mirror()
        opt = loco.DiLoCo([("p", p)], loco._loco.PythonCommunicator(old_backend, 0, 2, "old"),
                          schedule=loco.Every(1000))
        new_backend = Mirror()
        new = loco._loco.PythonCommunicator(new_backend, 0, 2, "new")
        outcome = []

        def queued_sync():
            try:
                opt.sync()
                outcome.append("returned")
            except KeyboardInterrupt:
                outcome.append("KeyboardInterrupt")
            except loco.CommError as e:
                outcome.append(f"CommError: {e}")

        thread = threading.Thread(target=queued_sync)
        new_backend.raise_in["all_reduce"] = (KeyboardInterrupt(), thread)

        def start_queued():  # in regroup()'s first collective, the handle's lock held
            thread.start()
            time.sleep(0.2)  # let the thread reach the lock (the order holds without it)

        new_backend.on_gather = start_queued
        opt.regroup(new)
        thread.join()
        self.assertEqual(outcome, ["KeyboardInterrupt"])
        self.assertIs(opt.comm, new)
        applied, synced = opt.step()  # nothing was kept to raise later
        self.assertTrue(applied and not synced)
        gone = weakref.ref(old_backend)
        del old_backend
        gc.collect()
        self.assertIsNone(gone(), "the old communicator is still held after regroup()")


if __name__ == "__main__":
    unittest.main(verbosity=2)
