"""Bad input from Python: each mistake is a loco exception of one sentence, and nothing the user
owns (parameters, gradients, the optimizer's state) is changed by the failed call.

A gradient on another device than its parameter cannot be built in a CPU-only PyTorch (torch
refuses the assignment itself); the DLPack adapter's refusal of it is tested in
tests/dlpack_test.cpp, and the Python check is the same comparison of devices.
"""

import unittest

import torch

import loco


def params(**shapes):
    out = []
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        out.append((name, p))
    return out


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
                self.assertTrue(torch.equal(p.grad, g))
        return msg

    def test_non_contiguous_tensor(self):
        ps = params(w=(4, 6))
        t = torch.nn.Parameter(torch.randn(6, 4).t())  # a transposed view
        t.grad = torch.zeros(4, 6)
        ps.append(("t", t))
        self.refused(loco.InvalidArgument, ps, lambda: loco.DiLoCo(ps, loco.Single()),
                     "'t'", "not contiguous")

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

    def test_communicator_not_initialised(self):
        with self.assertRaises(loco.CommError):
            loco.TorchDistributed()


if __name__ == "__main__":
    unittest.main(verbosity=2)
