"""MuLoCo's 2-bit statistical quantizer and its error feedback against a plain PyTorch
re-computation of algorithms.md section 4.3 (QuantizationCompressor._quantize, _save_grads):

    shift = mean(v);  c = v - shift;  sigma = sqrt(var_unbiased(c));  scale = R * sigma / B
    q = clamp(round(c / scale + B/2), 0, B - 1);  lut_b = mean{c_i : q_i = b};  deq = lut[q] + shift
    e <- beta * e + eta * delta;  send Q(e);  e <- e - D(Q(e))

The reference sums in float64 and rounds shift, scale and the table to float32, as loco documents
(include/loco/compress/statistical.hpp); the codes are computed in float32 as loco does.
"""

import os
import random
import unittest

import torch

import loco

SEED = int(os.environ.get("LOCO_TEST_SEED", random.randrange(2**31)))
print(f"test_two_bit: seed {SEED} (LOCO_TEST_SEED={SEED} repeats this run)")
B = 4
R = 6.0
HEADER = 40  # wire::header_bytes (include/loco/compress/wire.hpp)


def quantize_group(v):
    """Decoded values of one group (a tensor, or one row)."""
    n = v.numel()
    vd = v.double()
    shift = (vd.sum() / n).float()
    c = vd - shift.double()
    if n > 1:
        sigma = torch.sqrt((c * c).sum() / (n - 1))
        scale = (R * sigma / B).float()
        if scale.item() == 0.0 or not torch.isfinite(scale):
            scale = torch.tensor(1.0)
    else:
        scale = torch.tensor(1.0)
    t = (v - shift) / scale + float(B // 2)            # float32, like loco's code()
    q = torch.round(t).clamp(0, B - 1).long()           # torch.round rounds half to even
    lut = torch.zeros(B, dtype=torch.float32)
    for b in range(B):
        mask = q == b
        if mask.any():
            lut[b] = (c[mask].sum() / mask.sum()).float()
    return lut[q] + shift, q


def quantize(v, rows=None):
    if rows is None:
        return quantize_group(v.reshape(-1))[0].reshape(v.shape)
    groups = v.reshape(rows, -1)
    return torch.stack([quantize_group(g)[0] for g in groups]).reshape(v.shape)


class TwoBitQuantizer(unittest.TestCase):
    def test_round_trip_matches_pytorch(self):
        gen = torch.Generator().manual_seed(SEED)
        cases = [(1000,), (5000,), (3,), (1,), (64, 33), (7, 300)]
        for shape in cases:
            for per_row in (False, True):
                if per_row and len(shape) != 2:
                    continue
                x = torch.randn(shape, generator=gen) * 10 ** torch.empty(1).uniform_(-3, 3,
                                                                                  generator=gen)
                x += torch.randn(1, generator=gen)  # a nonzero mean
                out = torch.empty_like(x)
                size = loco.two_bit_round_trip(x, out, rows=shape[0] if per_row else 0,
                                               per_row=per_row)
                ref = quantize(x, shape[0] if per_row else None)
                with self.subTest(shape=shape, per_row=per_row):
                    # Equal up to float32 rounding of the statistics (at most one unit in the
                    # last place of the table entries, in rare elements).
                    tol = 4e-7 * x.abs().max().item()
                    self.assertLessEqual((out - ref).abs().max().item(), tol)
                    groups = shape[0] if per_row else 1
                    n = x.numel()
                    # The documented payload: header, G records of 1 + B floats, packed codes.
                    code_bytes = (n * 2 + 7) // 8
                    self.assertEqual(size, HEADER + 4 * groups * (1 + B) + 4 * ((code_bytes + 3) // 4))
                    # At most four distinct values per group: 2 bits each.
                    for g in out.reshape(groups, -1):
                        self.assertLessEqual(len(torch.unique(g)), B)

    def test_codes_follow_the_documented_thresholds(self):
        # Values at known multiples of sigma land in the bins algorithms.md lists:
        # c < -2.25 sigma -> 0, [-2.25, -0.75) -> 1, |c| < 0.75 -> 2, >= 0.75 -> 3.
        x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0] * 50)
        _, q = quantize_group(x)
        out = torch.empty_like(x)
        loco.two_bit_round_trip(x, out)
        sigma = x.std().item()
        c = x - x.mean()
        expected = torch.where(c < -2.25 * sigma, 0,
                               torch.where(c < -0.75 * sigma, 1,
                                           torch.where(c < 0.75 * sigma, 2, 3)))
        self.assertTrue(torch.equal(q, expected))
        ref, _ = quantize_group(x)
        self.assertLessEqual((out - ref).abs().max().item(), 1e-6)


class MuLoCoErrorFeedback(unittest.TestCase):
    def test_three_syncs_match_pytorch(self):
        """One worker, every parameter routed to AdamW (role vector), H = 3, 3 rounds: the
        residual and the global parameters follow the PyTorch recomputation of inner AdamW,
        error feedback with the outer lr folded in, the 2-bit quantizer per tensor and
        torch.optim.SGD(nesterov=True) on the decoded pseudo-gradient."""
        gen = torch.Generator().manual_seed(SEED + 1)
        shapes = {"a": (40, 10), "b": (300,), "c": (7,)}
        ours = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in shapes.items()}
        for p in ours.values():
            p.grad = torch.zeros_like(p)
        local = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
        glob = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
        resid = {n: torch.zeros(s) for n, s in shapes.items()}
        outer_lr, decay, H = 0.7, 0.9, 3
        opt = loco.DiLoCo(ours.items(), loco.Single(),
                          inner=loco.MuonAdamW(loco.Muon(), loco.AdamW(lr=1e-2)),
                          outer=loco.Nesterov(lr=outer_lr, momentum=0.9),
                          compressor=loco.TwoBit(decay=decay, fold_outer_lr=True),
                          schedule=loco.Every(H), roles={n: "vector" for n in shapes})
        inner = torch.optim.AdamW(local.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
        outer = torch.optim.SGD(glob.values(), lr=outer_lr, momentum=0.9, nesterov=True)
        for step in range(3 * H):
            for n in shapes:
                g = torch.randn(shapes[n], generator=gen)
                ours[n].grad.copy_(g)
                local[n].grad = g.clone()
            opt.step()
            inner.step()
            if (step + 1) % H == 0:
                for n in shapes:
                    delta = (glob[n] - local[n]).detach()
                    resid[n] = decay * resid[n] + outer_lr * delta
                    sent = quantize(resid[n])
                    resid[n] = resid[n] - sent
                    glob[n].grad = sent
                outer.step()
                with torch.no_grad():
                    for n in shapes:
                        local[n].copy_(glob[n])
        self.assertEqual(opt.outer_steps, 3)
        flat_resid = torch.cat([resid[n].reshape(-1) for n in shapes])
        flat_glob = torch.cat([glob[n].detach().reshape(-1) for n in shapes])
        self.assertGreater(flat_resid.abs().max().item(), 1e-3)
        self.assertLess((opt.compressor_state()[:flat_resid.numel()] - flat_resid).abs().max().item(), 1e-5)
        self.assertLess((opt.global_params() - flat_glob).abs().max().item(), 1e-5)
        for n in shapes:
            self.assertLess((ours[n] - local[n]).abs().max().item(), 1e-5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
