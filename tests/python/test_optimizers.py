"""loco's AdamW, SGD-Nesterov and outer Adam against torch.optim, on random tensors for 20 steps.

PyTorch is the independent reference: the same parameters and gradients go through torch.optim
and through loco (tensors updated in place via DLPack), and the results must agree to float32
rounding. Fresh random inputs per run; the seed is printed (LOCO_TEST_SEED repeats a run).
"""

import os
import random
import unittest

import torch

import loco

SEED = int(os.environ.get("LOCO_TEST_SEED", random.randrange(2**31)))
print(f"test_optimizers: seed {SEED} (LOCO_TEST_SEED={SEED} repeats this run)")

SHAPES = {"w1": (17, 9), "b1": (17,), "w2": (4, 17), "scale": (1,)}


def make_params(gen):
    """Two identical sets of parameters (loco's and torch's), gradients allocated."""
    ours, theirs = [], []
    for name, shape in SHAPES.items():
        value = torch.randn(shape, generator=gen)
        a = torch.nn.Parameter(value.clone())
        b = torch.nn.Parameter(value.clone())
        a.grad = torch.zeros(shape)
        b.grad = torch.zeros(shape)
        ours.append((name, a))
        theirs.append(b)
    return ours, theirs


def set_grads(ours, theirs, gen):
    for (_, a), b in zip(ours, theirs):
        g = torch.randn(a.shape, generator=gen) * 3.0
        a.grad.copy_(g)   # in place: loco reads this tensor
        b.grad = g.clone()


def max_diff(ours, theirs):
    return max((a.detach() - b.detach()).abs().max().item() for (_, a), b in zip(ours, theirs))


class InnerOptimizers(unittest.TestCase):
    def run_pair(self, policy, reference, steps=20):
        gen = torch.Generator().manual_seed(SEED)
        ours, theirs = make_params(gen)
        start = [a.detach().clone() for _, a in ours]
        opt = loco.Optimizer(ours, policy)
        ref = reference(theirs)
        for _ in range(steps):
            set_grads(ours, theirs, gen)
            self.assertTrue(opt.step())
            ref.step()
        moved = max((a.detach() - s).abs().max().item() for (_, a), s in zip(ours, start))
        self.assertGreater(moved, 1e-3)  # the comparison below is not vacuous
        self.assertLess(max_diff(ours, theirs), 1e-5)
        self.assertEqual(opt.steps, steps)

    def test_adamw_matches_torch(self):
        self.run_pair(loco.AdamW(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                   weight_decay=0.1))

    def test_sgd_nesterov_matches_torch(self):
        self.run_pair(loco.SGD(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
                      lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-2))

    def test_optimizer_checkpoint_round_trip(self):
        gen = torch.Generator().manual_seed(SEED + 1)
        ours, theirs = make_params(gen)
        opt = loco.Optimizer(ours, loco.AdamW(lr=1e-2))
        for _ in range(3):
            set_grads(ours, theirs, gen)
            opt.step()
        state = opt.state_dict()
        saved = [a.detach().clone() for _, a in ours]
        set_grads(ours, theirs, gen)
        grads = [a.grad.clone() for _, a in ours]
        opt.step()
        after = [a.detach().clone() for _, a in ours]
        # Back to the saved state and parameters: the same step gives the same bits.
        opt.load_state_dict(state)
        with torch.no_grad():
            for (_, a), s, g in zip(ours, saved, grads):
                a.copy_(s)
                a.grad.copy_(g)
        opt.step()
        for (_, a), x in zip(ours, after):
            self.assertTrue(torch.equal(a.detach(), x))


class OuterAdam(unittest.TestCase):
    def test_outer_adam_matches_torch_adam(self):
        """loco::outer::adam with bias correction is torch.optim.Adam(eps=tau) on the averaged
        pseudo-gradient. With inner SGD at lr 1 and one worker syncing every step, the
        pseudo-gradient global - local is the gradient (to float32 rounding), so 20 steps of
        DiLoCo(SGD(1), OuterAdam) follow 20 steps of torch.optim.Adam."""
        gen = torch.Generator().manual_seed(SEED + 2)
        ours, theirs = make_params(gen)
        opt = loco.DiLoCo(ours, loco.Single(), inner=loco.SGD(lr=1.0),
                          outer=loco.OuterAdam(lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3,
                                               bias_correction=True),
                          schedule=loco.Every(1))
        ref = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-3)
        for _ in range(20):
            set_grads(ours, theirs, gen)
            self.assertEqual(opt.step(), (True, True))
            ref.step()
        self.assertEqual(opt.outer_steps, 20)
        self.assertLess(max_diff(ours, theirs), 1e-5)
        # The global parameters are what the outer step produced; the local ones were merged.
        flat = torch.cat([a.detach().reshape(-1) for _, a in ours])
        self.assertTrue(torch.equal(opt.global_params(), flat))
        # A float32 copy: writing it changes nothing in the handle. (It comes as bytes, not as a
        # list of Python floats.) Without a compressor the residual is empty.
        copy = opt.global_params()
        self.assertEqual(copy.dtype, torch.float32)
        copy.add_(1.0)
        self.assertTrue(torch.equal(opt.global_params(), flat))
        self.assertEqual(opt.compressor_state().dtype, torch.float32)
        self.assertEqual(opt.compressor_state().numel(), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
