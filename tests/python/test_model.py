"""A small torch.nn model trained for 100 steps with loco.DiLoCo: its loss falls, and follows the
same model trained by DiLoCo written in plain PyTorch (one worker: inner torch.optim.AdamW, outer
torch.optim.SGD(nesterov=True) on global - local every H steps) step for step.
"""

import copy
import os
import random
import unittest

import torch

import loco

SEED = int(os.environ.get("LOCO_TEST_SEED", random.randrange(2**31)))
print(f"test_model: seed {SEED} (LOCO_TEST_SEED={SEED} repeats this run)")
H = 10


def data(gen, teacher):
    x = torch.randn(64, 8, generator=gen)
    with torch.no_grad():
        y = teacher(x)
    return x, y


class SmallModel(unittest.TestCase):
    def test_loss_falls_like_the_reference(self):
        torch.manual_seed(SEED)
        teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        ref = copy.deepcopy(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt = loco.DiLoCo(model.named_parameters(), loco.Single(),
                          inner=loco.AdamW(lr=1e-2, weight_decay=0.01),
                          outer=loco.Nesterov(lr=0.7, momentum=0.9), schedule=loco.Every(H))
        inner = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.01)
        glob = [torch.nn.Parameter(p.detach().clone()) for p in ref.parameters()]
        outer = torch.optim.SGD(glob, lr=0.7, momentum=0.9, nesterov=True)

        gen = torch.Generator().manual_seed(SEED)
        losses, ref_losses = [], []
        for step in range(100):
            x, y = data(gen, teacher)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())

            inner.zero_grad()
            ref_loss = torch.nn.functional.mse_loss(ref(x), y)
            ref_loss.backward()
            inner.step()
            ref_losses.append(ref_loss.item())
            if (step + 1) % H == 0:
                for g, p in zip(glob, ref.parameters()):
                    g.grad = (g - p).detach()
                outer.step()
                with torch.no_grad():
                    for g, p in zip(glob, ref.parameters()):
                        p.copy_(g)

        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        self.assertLess(last, 0.3 * first, f"loss {first:.4f} -> {last:.4f}")
        for step, (a, b) in enumerate(zip(losses, ref_losses)):
            self.assertAlmostEqual(a, b, delta=1e-4 * max(1.0, abs(b)), msg=f"step {step}")
        self.assertEqual(opt.outer_steps, 100 // H)


if __name__ == "__main__":
    unittest.main(verbosity=2)
