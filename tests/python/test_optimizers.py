"""loco's AdamW, SGD-Nesterov and outer Adam against torch.optim, on random tensors for 20 steps.

PyTorch is the independent reference: the same parameters and gradients go through torch.optim
and through loco (tensors updated in place via DLPack), and the results must agree to float32
rounding. Fresh random inputs per run; the seed is printed (LOCO_TEST_SEED repeats a run).

The same comparison pins the policies' defaults (the paper values docs/pytorch.md lists) and
set_lr(); the defaults are also checked against the C++ hyper-parameter defaults (a handle built
from an empty dict) and against the values docs/pytorch.md states.
"""

import ast
import dataclasses
import inspect
import os
import random
import re
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
        # The dict names what saved it (docs/pytorch.md: {"format", "kind", "bytes"}), and the
        # bytes may come back as any bytes-like object (a bytearray, as a file read leaves them,
        # or a memoryview): each restores the same state.
        self.assertEqual(state["format"], "loco-checkpoint")
        self.assertEqual(state["kind"], "Optimizer")
        for wrap in (bytearray, memoryview):
            with self.subTest(bytes_as=wrap.__name__):
                opt.load_state_dict(dict(state, bytes=wrap(state["bytes"])))
                self.assertEqual(opt.state_dict(), state)


class DiLoCoAgainstTorch:
    """One worker syncing at every step: loco.DiLoCo built by `build` against the inner torch
    optimizer on a local copy and the outer one on a global copy, whose gradient is global -
    local (DiLoCo's outer step), the local copy then set to the global one."""

    def __init__(self, gen, build, inner, outer):
        self.ours, self.local = make_params(gen)
        self.glob = [torch.nn.Parameter(t.detach().clone()) for t in self.local]
        self.start = [t.detach().clone() for t in self.local]
        self.opt = build(self.ours)
        self.inner, self.outer = inner(self.local), outer(self.glob)

    def step(self, gen):
        set_grads(self.ours, self.local, gen)
        self.opt.step()
        self.inner.step()
        for g, x in zip(self.glob, self.local):
            g.grad = (g - x).detach()
        self.outer.step()
        with torch.no_grad():
            for x, g in zip(self.local, self.glob):
                x.copy_(g)

    def differs(self):
        """How far loco's parameters are from the reference's global ones."""
        return max_diff(self.ours, self.glob)

    def moved(self):
        return max((a.detach() - s).abs().max().item() for (_, a), s in zip(self.ours, self.start))


class FedAdam(torch.optim.Optimizer):
    """Outer Adam without bias correction (loco::outer::adam's default, Reddi et al. 2020):
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr m / (sqrt(v) + tau)."""

    def __init__(self, params, lr, betas, tau):
        super().__init__(params, dict(lr=lr, betas=betas, tau=tau))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.sub_(group["lr"] * st["m"] / (st["v"].sqrt() + group["tau"]))


class Defaults(unittest.TestCase):
    """The policies' defaults are the paper values: what docs/pytorch.md lists, what the C++
    hyper structs hold (but TwoBit's, documented to differ), and, run against torch.optim with
    those values written out, the same steps."""

    def run_against(self, build, inner, outer, steps=20):
        gen = torch.Generator().manual_seed(SEED + 3)
        run = DiLoCoAgainstTorch(gen, build, inner, outer)
        for _ in range(steps):
            run.step(gen)
        self.assertGreater(run.moved(), 1e-3)
        self.assertLess(run.differs(), 1e-5)

    def test_default_handles_match_torch_with_the_paper_values(self):
        # DiLoCo's defaults: inner AdamW(4e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1),
        # outer SGD with Nesterov momentum, lr 0.7, momentum 0.9 (Douillard et al. 2023).
        self.run_against(
            lambda ps: loco.DiLoCo(ps, loco.Single(), schedule=loco.Every(1)),
            lambda ps: torch.optim.AdamW(ps, lr=4e-4, betas=(0.9, 0.95), eps=1e-8,
                                         weight_decay=0.1),
            lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True))
        # Outer Adam: betas (0.9, 0.99), tau 1e-3, lr 1e-2; without bias correction by default
        # (FedAdam), torch.optim.Adam(eps=tau) with it. Inner SGD: lr 1e-3, no momentum.
        self.run_against(
            lambda ps: loco.DiLoCo(ps, loco.Single(), inner=loco.SGD(), outer=loco.OuterAdam(),
                                   schedule=loco.Every(1)),
            lambda ps: torch.optim.SGD(ps, lr=1e-3),
            lambda ps: FedAdam(ps, lr=1e-2, betas=(0.9, 0.99), tau=1e-3))
        self.run_against(
            lambda ps: loco.DiLoCo(ps, loco.Single(), inner=loco.SGD(lr=0.1),
                                   outer=loco.OuterAdam(bias_correction=True),
                                   schedule=loco.Every(1)),
            lambda ps: torch.optim.SGD(ps, lr=0.1),
            lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-3))

    def test_defaults_are_the_cpp_defaults(self):
        # Each compiled configuration built from the default dataclasses against the same
        # configuration built from an empty dict (the C++ hyper structs' defaults): the same
        # fingerprint (schedule, compressor, aggregation, outer step, broadcast_initial,
        # max_skipped_syncs), and the same inner steps bit for bit. TwoBit is the documented
        # exception: MuLoCo's decay 0.9 with the outer lr folded in, where C++'s error feedback
        # defaults to the classic form.
        shapes = {"w": (8, 6), "b": (8,), "c": (5,), "d": (3,)}  # four tensors: Streaming's 4
        roles = {"w": "matrix", "b": "vector", "c": "vector", "d": "vector"}

        def model():
            gen = torch.Generator().manual_seed(SEED + 4)
            out = []
            for name, shape in shapes.items():
                p = torch.nn.Parameter(torch.randn(shape, generator=gen))
                p.grad = torch.zeros(shape)
                out.append((name, p))
            return out

        self.assertGreaterEqual(len(loco._CONFIGS), 7)
        for (inner, outer, compressor, schedule), name in loco._CONFIGS.items():
            with self.subTest(config=name):
                muloco = inner is loco.MuonAdamW
                ours, theirs = model(), model()
                kw = dict(inner=inner(), outer=outer(), schedule=schedule())
                if compressor is not type(None):
                    kw["compressor"] = compressor()
                opt = loco.DiLoCo(ours, loco.Single(), roles=roles if muloco else None, **kw)
                hyper = {"compress": {"decay": 0.9, "fold_outer_lr": True}} if muloco else {}
                ref = getattr(loco._loco, name)(loco._items(theirs, roles if muloco else None)[0],
                                                loco.Single(), hyper)
                ref.start()
                self.assertEqual(opt.fingerprint, ref.fingerprint)
                gen = torch.Generator().manual_seed(SEED + 5)
                for _ in range(3):
                    for (_, a), (_, b) in zip(ours, theirs):
                        g = torch.randn(a.shape, generator=gen)
                        a.grad.copy_(g)
                        b.grad.copy_(g)
                    self.assertEqual(opt.step(), ref.step()[:2])
                for (n, a), (_, b) in zip(ours, theirs):
                    self.assertTrue(torch.equal(a.detach(), b.detach()), n)
        for policy, kind in ((loco.AdamW, "adamw"), (loco.SGD, "sgd")):
            with self.subTest(optimizer=kind):
                ours, theirs = model(), model()
                opt = loco.Optimizer(ours, policy())
                ref = getattr(loco._loco, f"Optimizer_{kind}")(loco._items(theirs, None)[0], {})
                for (_, a), (_, b) in zip(ours, theirs):
                    a.grad.fill_(0.5)
                    b.grad.fill_(0.5)
                opt.step()
                ref.step()
                for (n, a), (_, b) in zip(ours, theirs):
                    self.assertTrue(torch.equal(a.detach(), b.detach()), n)

    def assert_same(self, got, documented, what):
        """Equal, and a flag where the docs give True or False (True == 1 would pass)."""
        self.assertEqual(got, documented, what)
        self.assertEqual(isinstance(got, bool), isinstance(documented, bool), what)

    def test_defaults_are_the_documented_ones(self):
        # docs/pytorch.md lists every policy as Name(field=default, ...) (alternatives after the
        # default as | "other") in the paragraph "The policies are dataclasses ...", and the
        # signature of loco.DiLoCo: the dataclasses have exactly those fields, in that order,
        # with those defaults.
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs",
                            "pytorch.md")
        with open(path, encoding="utf-8") as f:
            doc = f.read()
        policies = {name: getattr(loco, name) for name in loco.__all__
                    if dataclasses.is_dataclass(getattr(loco, name))}
        self.assertGreaterEqual(len(policies), 13)
        start = doc.index("The policies are dataclasses")
        paragraph = doc[start:doc.index("\n\n", start)]
        listed = {name: " ".join(args.split())
                  for name, args in re.findall(r"`(\w+)\(([^`]*)\)`", paragraph)}
        self.assertEqual(sorted(listed), sorted(policies))

        def parse(args):
            """[(name, default or inspect.Parameter.empty)] of "a=1, b="x" | "y", c"."""
            out = []
            for part in re.split(r",\s*(?=\w+(?:=|,|$))", args):
                name, eq, value = part.partition("=")
                if not eq:
                    out.append((name.strip(), inspect.Parameter.empty))
                elif value.strip() == "...":
                    out.append((name.strip(), ...))
                else:
                    out.append((name.strip(), ast.literal_eval(value.split("|")[0].strip())))
            return out

        for name, args in listed.items():
            with self.subTest(policy=name):
                documented = parse(args)
                fields = dataclasses.fields(policies[name])
                self.assertEqual([n for n, _ in documented], [f.name for f in fields])
                instance = policies[name]()
                for n, value in documented:
                    if value is not inspect.Parameter.empty:
                        self.assert_same(getattr(instance, n), value, n)
        # loco.DiLoCo(named_params, comm, inner=..., ..., max_skipped_syncs=10, ...).
        signature = re.search(r"`loco\.DiLoCo\(([^`]*)\)`", doc).group(1)
        documented = parse(" ".join(signature.split()))
        parameters = list(inspect.signature(loco.DiLoCo).parameters.values())
        self.assertEqual([n for n, _ in documented], [p.name for p in parameters])
        for (n, value), p in zip(documented, parameters):
            if value is not ...:
                self.assert_same(p.default, value, n)


class SetLr(unittest.TestCase):
    def test_each_rate_goes_to_its_optimizer(self):
        # set_lr(inner=a, outer=b) sets the inner AdamW's rate to a and the outer Nesterov's to
        # b, as param_groups[0]["lr"] of the torch optimizers; a rate left None stays.
        gen = torch.Generator().manual_seed(SEED + 6)
        run = DiLoCoAgainstTorch(
            gen, lambda ps: loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(lr=0.05),
                                        outer=loco.Nesterov(lr=0.7, momentum=0.9),
                                        schedule=loco.Every(1)),
            lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.9, 0.95), eps=1e-8,
                                         weight_decay=0.1),
            lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True))
        for inner, outer in ((None, None), (0.01, 0.3), (None, 0.9), (0.002, None)):
            if inner is not None or outer is not None:
                run.opt.set_lr(inner=inner, outer=outer)
            for opt, lr in ((run.inner, inner), (run.outer, outer)):
                if lr is not None:
                    opt.param_groups[0]["lr"] = lr
            for _ in range(3):
                run.step(gen)
            with self.subTest(inner=inner, outer=outer):
                self.assertLess(run.differs(), 1e-5)
        self.assertGreater(run.moved(), 1e-3)
        # A rate of 0 stops that optimizer alone: no inner update, the outer step still moves
        # the parameters by its momentum.
        run.opt.set_lr(inner=0.0)
        run.inner.param_groups[0]["lr"] = 0.0
        before = [a.detach().clone() for _, a in run.ours]
        run.step(gen)
        self.assertLess(run.differs(), 1e-5)
        self.assertFalse(all(torch.equal(a.detach(), b) for (_, a), b in zip(run.ours, before)))


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
        self.assertEqual(opt.state_dict()["kind"], "DiLoCo")  # as the Optimizer's names it


if __name__ == "__main__":
    unittest.main(verbosity=2)
