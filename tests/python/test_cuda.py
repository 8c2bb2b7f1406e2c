"""loco on CUDA tensors (loco::cuda::optimizer and loco::cuda::diloco, python/_loco_cuda.cu)
against PyTorch on the same data.

- loco.Optimizer with AdamW and SGD-Nesterov on CUDA tensors against torch.optim on CUDA tensors:
  20 steps of fresh random gradients, within 1e-5; once more on a side stream (stream=...).
- loco.DiLoCo on two processes with CUDA parameters: over NCCL (device memory, when there are two
  GPUs) or else over gloo (the CUDA handle stages its exchanges through host memory), against
  the plain-PyTorch DiLoCo of tests/python/test_diloco_gloo.py, within 1e-5 after 5 rounds; a
  state_dict() resume on the GPU is bit-identical; MuLoCo over the same communicator leaves the
  ranks with the same global parameters; SparseLoCo and DeMo (fp32 and signs) against the
  plain-PyTorch references of tests/python/test_frontier_gloo.py, parameters and residuals
  within 1e-5 after 5 rounds.

Needs a GPU, a CUDA PyTorch and the module built with CUDA: otherwise it prints why and exits
with 77, which CTest reports as skipped (SKIP_RETURN_CODE), never as passed. Where PyTorch sees a
GPU but the module was built without CUDA, it first checks that CUDA tensors are refused with one
sentence. Fresh random inputs per run; LOCO_TEST_SEED repeats one.
"""

import os
import sys
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loco

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_diloco_gloo as ref  # noqa: E402  (the PyTorch DiLoCo, its data and its model)
import test_frontier_gloo as frontier  # noqa: E402  (SparseLoCo and DeMo in plain PyTorch)

SEED = ref.SEED
SHAPES = {"w1": (17, 9), "b1": (17,), "w2": (4, 17), "kernel": (3, 2, 5, 5)}


def skip(why):
    print(f"test_cuda SKIPPED: {why}. These checks only count on a GPU with a CUDA build.")
    sys.exit(77)


def check_refused_without_cuda():
    """The module without CUDA, PyTorch with it: a CUDA tensor gets one sentence naming the fix."""
    p = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    p.grad = torch.zeros_like(p)
    try:
        loco.Optimizer([("w", p)], loco.AdamW())
    except loco.MemorySpaceError as e:
        msg = str(e)
        assert "built without CUDA" in msg and msg.count(". ") == 0, msg
        return
    raise AssertionError("a CUDA tensor was accepted by a module built without CUDA")


# ---- the inner optimizers against torch.optim on CUDA tensors -------------------------------------

def make_params(gen, device):
    ours, theirs = [], []
    for name, shape in SHAPES.items():
        value = torch.randn(shape, generator=gen).to(device)
        a = torch.nn.Parameter(value.clone())
        b = torch.nn.Parameter(value.clone())
        a.grad = torch.zeros_like(a)
        b.grad = torch.zeros_like(b)
        ours.append((name, a))
        theirs.append(b)
    return ours, theirs


def set_grads(ours, theirs, gen):
    for (_, a), b in zip(ours, theirs):
        g = (torch.randn(a.shape, generator=gen) * 3.0).to(a.device)
        a.grad.copy_(g)  # in place: loco reads this tensor
        b.grad = g.clone()


def max_diff(ours, theirs):
    return max((a.detach() - b.detach()).abs().max().item() for (_, a), b in zip(ours, theirs))


class CudaOptimizers(unittest.TestCase):
    def run_pair(self, policy, reference, side_stream=False, steps=20):
        device = torch.device("cuda", torch.cuda.current_device())
        gen = torch.Generator().manual_seed(SEED)
        ours, theirs = make_params(gen, device)
        start = [a.detach().clone() for _, a in ours]
        stream = torch.cuda.Stream(device) if side_stream else None
        opt = loco.Optimizer(ours, policy, stream=stream)
        self.assertEqual(opt.device, device)
        ref_opt = reference(theirs)
        current = torch.cuda.current_stream(device)
        for _ in range(steps):
            set_grads(ours, theirs, gen)
            if stream is not None:
                stream.wait_stream(current)  # the gradients were written on the current stream
            self.assertTrue(opt.step())
            if stream is not None:
                current.wait_stream(stream)  # and the next reads follow loco's update
            ref_opt.step()
        torch.cuda.synchronize(device)
        moved = max((a.detach() - s).abs().max().item() for (_, a), s in zip(ours, start))
        self.assertGreater(moved, 1e-3)  # the comparison below is not vacuous
        self.assertLess(max_diff(ours, theirs), 1e-5)
        self.assertEqual(opt.steps, steps)

    def test_adamw_matches_torch(self):
        for side_stream in (False, True):
            with self.subTest(side_stream=side_stream):
                self.run_pair(loco.AdamW(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                                         weight_decay=0.1),
                              lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95),
                                                           eps=1e-8, weight_decay=0.1),
                              side_stream=side_stream)

    def test_sgd_nesterov_matches_torch(self):
        self.run_pair(loco.SGD(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
                      lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-2))

    def test_mixed_devices_are_refused(self):
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(3, device="cuda"))
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        with self.assertRaises(loco.MemorySpaceError) as e:
            loco.Optimizer([("a", a), ("b", b)], loco.AdamW())
        self.assertIn("keep the whole model on one device", str(e.exception))


# ---- DiLoCo on two processes against the PyTorch DiLoCo -------------------------------------------

def cuda_params(rank, device):
    params = {n: torch.nn.Parameter(v.clone().to(device))
              for n, v in ref.initial_values(rank).items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    return params


def train(opt, params, rank, first, last):
    device = next(iter(params.values())).device
    for step in range(first, last):
        opt.zero_grad()
        x, y = ref.batch(rank, step)
        ref.loss_of(params, x.to(device), y.to(device)).backward()
        opt.step()


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def worker(rank, init_file, backend):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="file://" + init_file, rank=rank,
                            world_size=ref.WORLD)
    # The reference's CPU tensors travel over gloo whatever the default group is.
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    comm = loco.TorchDistributed()
    check(comm.space == ("cuda" if backend == "nccl" else "host"), f"{backend}: {comm.space}")
    H, ROUNDS = ref.H, ref.ROUNDS

    def build(params, **kw):
        return loco.DiLoCo(params.items(), comm,
                           inner=loco.AdamW(lr=ref.INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                                            weight_decay=0.1),
                           outer=loco.Nesterov(**ref.OUTER), schedule=loco.Every(H), **kw)

    params = cuda_params(rank, device)
    opt = build(params)
    train(opt, params, rank, 0, H * 3)
    saved_state = opt.state_dict()
    saved_params = {n: p.detach().clone() for n, p in params.items()}
    train(opt, params, rank, H * 3, H * ROUNDS)
    expected = ref.reference(rank, cpu_group)
    diff = max((params[n].detach().cpu() - expected[n].detach()).abs().max().item()
               for n in ref.SHAPES)
    check(diff < 1e-5, f"{backend} rank {rank}: loco on CUDA and the PyTorch DiLoCo differ by "
                       f"{diff}")
    moved = max((params[n].detach().cpu() - ref.initial_values(0)[n]).abs().max().item()
                for n in ref.SHAPES)
    check(moved > 1e-2, f"rank {rank}: the parameters barely moved ({moved})")
    check(opt.outer_steps == ROUNDS and opt.inner_steps == H * ROUNDS, "step counters")

    # state_dict() on the GPU: a fresh handle resumed from round 3 ends where the run ended.
    ended = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved_params[n])
    resumed = build(params, start=False)
    resumed.load_state_dict(saved_state)
    train(resumed, params, rank, H * 3, H * ROUNDS)
    for n in ref.SHAPES:
        check(torch.equal(params[n].detach(), ended[n]), f"rank {rank}: resumed run differs")

    # MuLoCo (2-bit codes with error feedback) over the same communicator: ranks agree.
    ps = cuda_params(rank, device)
    o = loco.DiLoCo(ps.items(), comm,
                    inner=loco.MuonAdamW(loco.Muon(lr=0.02, momentum=0.9), loco.AdamW(lr=1e-2)),
                    outer=loco.Nesterov(), compressor=loco.TwoBit(), schedule=loco.Every(4),
                    roles={"w1": "matrix", "w2": "head", "b1": "vector", "b2": "vector"})
    train(o, ps, rank, 0, 12)
    check(o.outer_steps >= 2, f"muloco: {o.outer_steps} outer steps")
    o.sync()
    mine = o.global_params()
    other = [torch.zeros_like(mine) for _ in range(ref.WORLD)]
    dist.all_gather(other, mine, group=cpu_group)
    check(torch.equal(other[0], other[1]), "muloco: ranks differ after sync()")

    # SparseLoCo and DeMo on CUDA parameters against their PyTorch references.
    for case, settings in frontier.CASES.items():
        ps = cuda_params(rank, device)
        o = loco.DiLoCo(ps.items(), comm,
                        inner=loco.AdamW(lr=ref.INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                                         weight_decay=0.1),
                        schedule=loco.Every(H), **settings)
        train(o, ps, rank, 0, H * ROUNDS)
        expected, residual = frontier.reference(rank, case, cpu_group)
        diff = max((ps[n].detach().cpu() - expected[n].detach()).abs().max().item()
                   for n in ref.SHAPES)
        residual_diff = (o.compressor_state() - residual).abs().max().item()
        check(diff < 1e-5 and residual_diff < 1e-5,
              f"{backend} rank {rank}, {case}: parameters differ by {diff}, residuals by "
              f"{residual_diff}")
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


class CudaDiLoCo(unittest.TestCase):
    def test_two_processes(self):
        two_gpus = torch.cuda.device_count() >= 2 and dist.is_nccl_available()
        backend = "nccl" if two_gpus else "gloo"
        print(f"test_cuda: DiLoCo over {backend} ({torch.cuda.device_count()} GPUs), seed {SEED} "
              f"(LOCO_TEST_SEED={SEED} repeats this run)")
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(worker, args=(os.path.join(d, "rendezvous"), backend), nprocs=ref.WORLD,
                     join=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        skip("torch.cuda is not available (no GPU, or a PyTorch built without CUDA)")
    if not loco._loco.has_cuda:
        check_refused_without_cuda()
        skip("the loco module was built without CUDA (configure where nvcc is found, "
             "-DLOCO_ENABLE_CUDA=ON)")
    print(f"test_cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}, seed {SEED}")
    unittest.main(verbosity=2)
