"""Bad input from Python: each mistake is a loco exception of one sentence, and nothing the user
owns (parameters, gradients, the optimizer's state) is changed by the failed call.

A gradient on another device than its parameter cannot be built in a CPU-only PyTorch (torch
refuses the assignment itself); the DLPack adapter's refusal of it is tested in
tests/dlpack_test.cpp, and the Python check is the same comparison of devices.
"""

import unittest

import torch

import loco
from random_params import params


def snapshot(ps):
    return [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for _, p in ps]


class BadInput(unittest.TestCase):
    def refused(self, error, ps, build, *fragments):
        before = snapshot(ps)
        with self.assertRaises(error) as ctx:
            build()
        msg = str(ctx.exception)
        self.assertTrue(msg.startswith("loco"), msg)
        self.assertEqual(msg.count(". "), 0, f"more than one sentence: {msg}")
        self.assertNotIn("\n", msg)
        for f in fragments:
            self.assertIn(f, msg)
        for (_, p), (v, g) in zip(ps, before):
            self.assertTrue(torch.equal(p.detach(), v))
            if g is not None:
                dense = (lambda t: t.to_dense() if t.layout != torch.strided else t)
                self.assertTrue(torch.equal(dense(p.grad), dense(g)))
        return msg

    def test_non_contiguous_tensor(self):
        ps = params(w=(4, 6))
        t = torch.nn.Parameter(torch.randn(6, 4).t())  # a transposed view
        t.grad = torch.zeros(4, 6)
        ps.append(("t", t))
        self.refused(loco.InvalidArgument, ps, lambda: loco.DiLoCo(ps, loco.Single()),
                     "'t'", "not contiguous")

    def test_negated_view(self):
        # torch's lazy neg bit (torch._neg_view; the conj bit likewise) is not in DLPack: to_dlpack
        # exports the memory, which holds -x, so loco would descend along +grad. A value with the
        # bit is refused too: loco writes it in place.
        for which in ("value", "gradient"):
            for kind, build in (("DiLoCo", lambda ps: loco.DiLoCo(ps, loco.Single())),
                                ("Optimizer", lambda ps: loco.Optimizer(ps, loco.SGD(lr=1.0)))):
                with self.subTest(which=which, kind=kind):
                    ps = params(w=(3,))
                    p = (torch._neg_view(torch.randn(4)) if which == "value"
                         else torch.nn.Parameter(torch.randn(4)))
                    p.grad = (torch._neg_view(torch.randn(4)) if which == "gradient"
                              else torch.randn(4))
                    ps.append(("n", p))
                    self.refused(loco.InvalidArgument, ps, lambda: build(ps),
                                 f"the {which} of parameter 'n'", "neg or conj bit")

    def test_inference_tensor(self):
        # torch refuses to update an inference tensor in place outside inference mode only after
        # the write: every step() used to change the values and then raise torch's RuntimeError.
        for kind, build in (("DiLoCo", lambda ps: loco.DiLoCo(ps, loco.Single())),
                            ("Optimizer", lambda ps: loco.Optimizer(ps, loco.SGD(lr=0.1)))):
            with self.subTest(kind=kind):
                ps = params(w=(3,))
                with torch.inference_mode():
                    p = torch.ones(4)
                p.grad = torch.ones(4)
                ps.append(("frozen_copy", p))
                self.refused(loco.InvalidArgument, ps, lambda: build(ps),
                             "'frozen_copy'", "inference tensor")

    def test_tensor_without_gradient(self):
        ps = params(w=(3,))
        ps.append(("frozen", torch.nn.Parameter(torch.randn(2))))
        self.refused(loco.InvalidArgument, ps, lambda: loco.DiLoCo(ps, loco.Single()),
                     "'frozen' has no gradient")

    def test_unsupported_dtype(self):
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            ps = params(w=(3,))
            p = torch.nn.Parameter(torch.randn(5).to(dtype))
            p.grad = torch.zeros(5, dtype=dtype)
            ps.append(("half", p))
            self.refused(loco.InvalidArgument, ps, lambda: loco.DiLoCo(ps, loco.Single()),
                         "'half'", str(dtype), "torch.float32")

    def test_unknown_configuration_role_and_hyper_parameter(self):
        ps = params(w=(3, 3))
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), inner=loco.SGD(),
                                         outer=loco.Nesterov()),
                     "no compiled configuration SGD + Nesterov")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), roles={"w": "bias"}),
                     "role 'bias'")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), roles={"v": "matrix"}),
                     "'v', which is not a parameter")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(lr=-1.0)),
                     "lr must be finite and >= 0")

    def test_roles_dict_is_left_as_it_was(self):
        # loco reads the caller's roles, it does not consume them: the same dict builds a second
        # handle (one per worker, or a rebuilt one after a failure).
        ps = params(w=(3, 3), b=(3,))
        roles = {"w": "matrix", "b": "vector"}
        first = loco.DiLoCo(ps, loco.Single(), inner=loco.MuonAdamW(), compressor=loco.TwoBit(),
                            roles=roles)
        self.assertEqual(roles, {"w": "matrix", "b": "vector"})
        second = loco.DiLoCo(ps, loco.Single(), inner=loco.MuonAdamW(), compressor=loco.TwoBit(),
                             roles=roles)
        # The checkpoint holds the parameters' roles: the second handle was built with the same.
        self.assertEqual(first.state_dict()["bytes"], second.state_dict()["bytes"])

    def test_hyper_parameter_of_the_wrong_type(self):
        ps = params(w=(4, 4))
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(-1)),
                     "schedule Every hyper-parameter 'every' must be an integer in [0, ", "-1")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), outer=loco.OuterSGD(),
                                         compressor=loco.SparseLoCo(topk=2.5)),
                     "SparseLoCo hyper-parameter 'topk' must be an integer in [0, 4294967295]",
                     "2.5")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), outer=loco.SignSGD(),
                                         compressor=loco.DeMo(sign="yes")),
                     "DeMo hyper-parameter 'sign' must be True or False", "'yes'")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(lr="fast")),
                     "AdamW hyper-parameter 'lr' must be a number")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), outer=loco.OuterSGD(),
                                         compressor=loco.SparseLoCo(indices="huffman")),
                     "SparseLoCo indices must be 'compact' or 'fixed'")

    def test_gradient_replaced_after_construction(self):
        ps = params(w=(4,))
        opt = loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2))
        opt.step()
        ps[0][1].grad = torch.zeros(4)  # what zero_grad(set_to_none=True) + backward leads to
        state = opt.state_dict()
        self.refused(loco.InvalidArgument, ps, opt.step, "'w' was replaced")
        self.assertEqual(opt.calls, 1)
        self.assertEqual(opt.state_dict(), state)

    def test_storage_replaced_after_construction(self):
        # torch gives a parameter (or its gradient) new storage in place, the Python objects kept:
        # loco would write the old storage (freed by share_memory_(), whose step() crashed), or a
        # copy the model no longer uses (training silently stopped). Each entry point refuses.
        def share(m):
            m.share_memory()

        def double(m):
            m.double()

        def assign(m):
            m.weight.data = torch.zeros(2, 2)

        def assign_grad(m):
            m.weight.grad.data = torch.zeros(2, 2)

        for change, fragment in ((share, "parameter 'weight'"),
                                 (double, "parameter 'weight' was replaced"),
                                 (assign, "parameter 'weight' was replaced"),
                                 (assign_grad, "gradient of 'weight' was replaced")):
            for build in (lambda ps: loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2)),
                          lambda ps: loco.Optimizer(ps, loco.SGD(lr=0.1))):
                m = torch.nn.Linear(2, 2)
                for q in m.parameters():
                    q.grad = torch.ones_like(q)
                opt = build(list(m.named_parameters()))
                state = opt.state_dict()
                change(m)
                ps = list(m.named_parameters())

                def regroup():
                    opt.regroup(loco.Single())

                # flush() and regroup() write the parameters too (an exchange in flight, a
                # newcomer's heal), so they are refused like step().
                calls = [opt.step] + ([opt.sync, opt.start, opt.flush, regroup]
                                      if isinstance(opt, loco.DiLoCo) else [])
                for call in calls:
                    with self.subTest(change=change.__name__, call=call.__name__):
                        msg = self.refused(loco.InvalidArgument, ps, call, fragment)
                        self.assertIn("since the optimizer was built", msg)
                self.assertEqual(opt.state_dict(), state)

    def test_regroup_donor_is_checked(self):
        # The donor is a rank: a bool is refused, not taken as rank 0 or 1 (False == 0 would
        # heal from rank 0 without a word), and so are ranks outside [0, 2**31), before the
        # collective, nothing changed.
        ps = params(w=(4,))
        opt = loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2))
        opt.step()
        state = opt.state_dict()
        for donor, fragment in ((False, "donor must be a rank (an int), got bool"),
                                (True, "donor must be a rank (an int), got bool"),
                                (0.0, "donor must be a rank (an int), got float"),
                                (-1, "the donor rank -1 is not a rank"),
                                (2**31, "the donor rank 2147483648 is not a rank")):
            with self.subTest(donor=donor):
                self.refused(loco.InvalidArgument, ps,
                             lambda: opt.regroup(loco.Single(), donor=donor), fragment)
                self.assertEqual(opt.state_dict(), state)
        opt.regroup(loco.Single(), donor=0)  # rank 0 of one worker is a rank
        self.assertEqual(opt.calls, 1)

    def test_set_lr_is_checked(self):
        ps = params(w=(3, 3))
        for build in (lambda: loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2)),
                      lambda: loco.DiLoCo(ps, loco.Single(), inner=loco.MuonAdamW(),
                                          compressor=loco.TwoBit(), roles={"w": "matrix"},
                                          schedule=loco.Every(2))):
            opt = build()
            opt.step()
            state = opt.state_dict()
            for bad in (dict(outer=-5.0), dict(inner=float("nan")), dict(inner=-1.0),
                        dict(outer=float("inf"))):
                with self.subTest(bad=bad):
                    self.refused(loco.InvalidArgument, ps, lambda: opt.set_lr(**bad),
                                 "lr must be finite and >= 0")
                    self.assertEqual(opt.state_dict(), state)
            # The handle still steps (and syncs) with its old rates.
            opt.step()
            self.assertEqual(opt.outer_steps, 1)

    def test_set_lr_refused_changes_neither_rate(self):
        # A refused outer rate must not leave an accepted inner rate behind (it did: the next step
        # ran with inner lr 0). The next steps equal those of a twin handle never asked.
        ps = params(w=(3, 3))
        initial = ps[0][1].detach().clone()
        twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in ps]
        for (_, t), (_, p) in zip(twin, ps):
            t.grad = p.grad.clone()
        asked = loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(2))
        control = loco.DiLoCo(twin, loco.Single(), schedule=loco.Every(2))
        self.refused(loco.InvalidArgument, ps, lambda: asked.set_lr(inner=0.0, outer=-1.0),
                     "lr must be finite and >= 0")
        self.refused(loco.InvalidArgument, ps, lambda: asked.set_lr(inner=-1.0, outer=0.0),
                     "lr must be finite and >= 0")
        for _ in range(2):
            asked.step()
            control.step()
        self.assertTrue(torch.equal(ps[0][1].detach(), twin[0][1].detach()))
        self.assertFalse(torch.equal(ps[0][1].detach(), initial))  # both rates were in use

    def test_sparse_gradient(self):
        emb = torch.nn.Embedding(10, 4, sparse=True)
        emb(torch.tensor([1, 2])).sum().backward()
        ps = list(emb.named_parameters())
        for build in (lambda: loco.DiLoCo(ps, loco.Single()),
                      lambda: loco.Optimizer(ps, loco.AdamW())):
            self.refused(loco.InvalidArgument, ps, build,
                         "gradient of parameter 'weight' is a torch.sparse_coo tensor",
                         "sparse=False")

    def test_malformed_checkpoint_dict_and_roles(self):
        ps = params(w=(4,))
        opt = loco.DiLoCo(ps, loco.Single())
        opt.step()
        state = opt.state_dict()
        for bad in ({"format": "loco-checkpoint"}, {"format": "loco-checkpoint", "bytes": "abc"},
                    {"format": "loco-checkpoint", "bytes": None}, ["loco-checkpoint"]):
            with self.subTest(bad=bad):
                self.refused(loco.CheckpointError, ps, lambda: opt.load_state_dict(bad))
        # The marker is required even around valid bytes: a dict of another library's state
        # with a "bytes" key is not taken for loco's.
        for bad in ({"bytes": state["bytes"]}, dict(state, format="torch")):
            with self.subTest(bad=sorted(bad)):
                self.refused(loco.CheckpointError, ps, lambda: opt.load_state_dict(bad),
                             "needs a dict from state_dict() of a loco optimizer")
        self.assertEqual(opt.state_dict(), state)
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), roles={"w": 3}),
                     "role of parameter 'w' must be a string", "3")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), roles=["matrix"]),
                     "roles must be a dict")
        # The compiled half refuses it by name too (python/bound.hpp, read_params).
        w = ps[0][1]
        items = [("w", torch.utils.dlpack.to_dlpack(w.detach()),
                  torch.utils.dlpack.to_dlpack(w.grad), 3)]
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco._loco.Optimizer_sgd(items, {"lr": 0.1}),
                     "role of parameter 'w' must be a string")

    def test_communicator_outside_its_group(self):
        # torch.distributed's rank and size in a group this process is not in are -1.
        msg = self.refused(loco.InvalidArgument, [],
                           lambda: loco._loco.PythonCommunicator(object(), -1, -1, "torch"),
                           "not in the communicator's group")
        self.assertNotIn("size -1", msg)

    def test_bad_checkpoint(self):
        ps = params(w=(4,))
        opt = loco.DiLoCo(ps, loco.Single())
        other = loco.DiLoCo(params(w=(5,)), loco.Single())
        opt.step()
        state = opt.state_dict()
        self.refused(loco.CheckpointError, ps, lambda: opt.load_state_dict(other.state_dict()))
        self.refused(loco.CheckpointError, ps, lambda: opt.load_state_dict({"bytes": b""}))
        truncated = dict(state, bytes=state["bytes"][:-9])
        self.refused(loco.CheckpointError, ps, lambda: opt.load_state_dict(truncated))
        self.assertEqual(opt.state_dict(), state)

    def test_checkpoint_of_another_matrix_shape(self):
        # Same name, same element count, 8 x 6 against 6 x 8: refused (the checkpoint records
        # the shapes since format 4), for MuLoCo too, whose Muon momentum is a matrix.
        for kw in (dict(), dict(inner=loco.MuonAdamW(), compressor=loco.TwoBit(),
                                roles={"w": "matrix"})):
            with self.subTest(muon=bool(kw)):
                saved = loco.DiLoCo(params(w=(8, 6)), loco.Single(), **kw)
                saved.step()
                ps = params(w=(6, 8))
                opt = loco.DiLoCo(ps, loco.Single(), start=False, **kw)
                state = opt.state_dict()
                self.refused(loco.CheckpointError, ps,
                             lambda: opt.load_state_dict(saved.state_dict()),
                             "'w' is 8 x 6 but this handle's is 6 x 8")
                self.assertEqual(opt.state_dict(), state)

    def test_two_bit_round_trip_arguments(self):
        # Each refusal a loco exception of one sentence, `out` untouched (rows=-1 was pybind11's
        # TypeError from the conversion to an unsigned size).
        x = torch.randn(12)
        out = torch.full((12,), 7.0)
        # rows=2**64, past std::size_t, was pybind11's TypeError too; 2**64 - 1 is the largest
        # that reaches the quantizer, which refuses it by shape.
        for kw, error, fragment in (
                (dict(rows=-1), loco.InvalidArgument, "rows must be a whole number >= 0"),
                (dict(rows=2.5), loco.InvalidArgument, "rows must be a whole number >= 0"),
                (dict(rows=True), loco.InvalidArgument, "rows must be a whole number >= 0"),
                (dict(rows=2**64, per_row=True), loco.InvalidArgument, "below 2**64"),
                (dict(rows=2**64), loco.InvalidArgument, "below 2**64"),
                (dict(rows=2**64 - 1, per_row=True), loco.ShapeError,
                 "12 elements in 18446744073709551615 rows"),
                (dict(rows=5, per_row=True), loco.Error, "rows"),
                (dict(range=0.0), loco.Error, "range")):
            with self.subTest(kw=kw):
                with self.assertRaises(error) as ctx:
                    loco.two_bit_round_trip(x, out, **kw)
                msg = str(ctx.exception)
                self.assertTrue(msg.startswith("loco"), msg)
                self.assertIn(fragment, msg)
                self.assertTrue(torch.equal(out, torch.full((12,), 7.0)))
        for args in ((torch._neg_view(x), out), (x, torch._neg_view(out))):
            with self.assertRaises(loco.InvalidArgument) as ctx:
                loco.two_bit_round_trip(*args)
            self.assertIn("neg bit", str(ctx.exception))
            self.assertTrue(torch.equal(out, torch.full((12,), 7.0)))

    def test_device_and_stream(self):
        # A device loco cannot address (the meta device: shapes without storage).
        ps = params(w=(3,))
        m = torch.nn.Parameter(torch.empty(2, device="meta"))
        m.grad = torch.empty(2, device="meta")
        ps.append(("m", m))
        self.refused(loco.MemorySpaceError, ps[:1],
                     lambda: loco.DiLoCo(ps, loco.Single()), "'m'", "meta", "cannot address")
        # A CUDA stream for CPU parameters.
        ps = params(w=(3,))
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.Optimizer(ps, loco.AdamW(), stream=1234), "stream", "CPU")
        self.refused(loco.InvalidArgument, ps,
                     lambda: loco.DiLoCo(ps, loco.Single(), stream=1234), "stream", "CPU")

    def test_a_failed_collective_is_one_line(self):
        # The Python exception's type and message, without pybind11's traceback ("At: ...").
        class Failing:
            def all_reduce(self, capsule, mean):
                raise RuntimeError("connection reset\nby peer")

        from loco import _loco
        ps = params(w=(3,))
        comm = _loco.PythonCommunicator(Failing(), 0, 2, "failing")
        msg = self.refused(loco.CommError, ps, lambda: loco.DiLoCo(ps, comm),
                           "torch.distributed failed (RuntimeError: connection reset by peer)")
        self.assertNotIn("At:", msg)

    def test_communicator_not_initialised(self):
        with self.assertRaises(loco.CommError):
            loco.TorchDistributed()


if __name__ == "__main__":
    unittest.main(verbosity=2)
