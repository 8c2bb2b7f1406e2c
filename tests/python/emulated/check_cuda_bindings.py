"""The CUDA half of the Python module (python/_loco_cuda.cu) on the CPU emulator, where device
memory is host memory: torch CPU tensors view memory from the emulator's cudaMalloc, their DLPack
capsules are marked kDLCUDA, and the Cuda* classes run on them. CTest runs it as
python.cuda_emulated (python/CMakeLists.txt builds the module); run.sh here is the same by hand.

- CudaOptimizer_adamw / _sgd against torch.optim, 20 steps of random gradients, within 1e-5;
- CudaDiLoCo_adamw_nesterov on two gloo processes against the PyTorch DiLoCo of
  tests/python/test_diloco_gloo.py (within 1e-5 after 5 rounds), through python/loco's
  torch.distributed glue, once with a communicator of host memory (the handle stages its
  exchanges through the host: gloo's path) and once of device memory (the handle all-reduces its
  device buffers: NCCL's path; the capsules are re-marked kDLCPU for torch's CPU from_dlpack,
  the only step that differs from a GPU);
- MuLoCo (2-bit codes, error feedback) on both: the ranks' global parameters agree after sync();
  regroup() heals a newcomer (its parameters become rank 0's global ones, bit for bit; the next
  sync agrees on both ranks) and refuses a communicator of the other memory space;
- SparseLoCo and DeMo (fp32 and signs) on both against the PyTorch re-computations of
  tests/python/test_frontier_gloo.py (parameters and residual within 1e-5 after 5 rounds).
What it cannot show: streams and NCCL's own stream (the emulator runs every launch at once).
"""

import ctypes
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import loco  # noqa: E402
from loco import _loco  # noqa: E402
import test_diloco_gloo as ref  # noqa: E402
import test_frontier_gloo as frontier  # noqa: E402

_get = ctypes.pythonapi.PyCapsule_GetPointer
_get.restype = ctypes.c_void_p
_get.argtypes = [ctypes.py_object, ctypes.c_char_p]
KDLCPU, KDLCUDA = 1, 2


def _device_type(capsule):
    # DLTensor: void* data, then DLDevice {int32 device_type, int32 device_id}.
    return ctypes.c_int32.from_address(_get(capsule, b"dltensor") + 8)


def cuda_capsule(t):
    capsule = torch.utils.dlpack.to_dlpack(t)
    _device_type(capsule).value = KDLCUDA
    return capsule


def device_tensor(shape):
    n = 1
    for e in shape:
        n *= e
    buf = (ctypes.c_float * n).from_address(_loco.emulated_alloc(4 * n))
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)


def device_params(values):
    out = {}
    for name, v in values.items():
        p = torch.nn.Parameter(device_tensor(tuple(v.shape)))
        with torch.no_grad():
            p.copy_(v)
        p.grad = device_tensor(tuple(v.shape))
        p.grad.zero_()
        out[name] = p
    return out


def set_grads(params, loss):
    for p, g in zip(params.values(), torch.autograd.grad(loss, list(params.values()))):
        p.grad.copy_(g)  # in place: loco reads this memory


def items(params, roles=None):
    roles = roles or {}
    return [(n, cuda_capsule(p.detach()), cuda_capsule(p.grad), roles.get(n, ""))
            for n, p in params.items()]


def optimizers():
    gen = torch.Generator().manual_seed(ref.SEED)
    ours = device_params({n: torch.randn(s, generator=gen) for n, s in ref.SHAPES.items()})
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    for p in theirs.values():
        p.grad = torch.zeros_like(p)
    cases = (
        (_loco.CudaOptimizer_adamw, dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
         lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
        (_loco.CudaOptimizer_sgd, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
         lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)))
    for cls, hyper, reference in cases:
        start = {n: p.detach().clone() for n, p in ours.items()}
        opt = cls(items(ours), hyper, 0)
        ref_opt = reference(list(theirs.values()))
        for _ in range(20):
            for n in ours:
                g = torch.randn(ours[n].shape, generator=gen)
                ours[n].grad.copy_(g)
                theirs[n].grad = g.clone()
            assert opt.step()
            ref_opt.step()
        diff = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
        moved = max((ours[n] - start[n]).abs().max().item() for n in ours)
        assert diff < 1e-5 and moved > 1e-3 and opt.steps == 20, (cls.__name__, diff, moved)
        print(f"{cls.__name__} against torch.optim: max difference {diff:.3g}")


class HostViewCollectives(loco._TorchCollectives):
    """python/loco's torch.distributed glue, with the one emulator step: a kDLCUDA capsule (host
    memory here) is re-marked kDLCPU so that torch's CPU from_dlpack takes it."""

    @staticmethod
    def _wrap(capsule):
        assert _device_type(capsule).value == KDLCUDA, "the communicator exported host memory"
        _device_type(capsule).value = KDLCPU
        return torch.utils.dlpack.from_dlpack(capsule)


def worker(rank, init_file, space):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    if space == "host":
        comm = loco.TorchDistributed()
    else:
        comm = _loco.PythonCommunicator(HostViewCollectives(None), rank, 2, "emulated_nccl",
                                        "cuda", 0)
    assert comm.space == space

    params = device_params(ref.initial_values(rank))
    hyper = {"inner": dict(lr=ref.INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
             "outer": dict(ref.OUTER), "schedule": {"every": ref.H}}
    handle = _loco.CudaDiLoCo_adamw_nesterov(items(params), comm, hyper, 0)
    handle.start()
    for step in range(ref.H * ref.ROUNDS):
        x, y = ref.batch(rank, step)
        set_grads(params, ref.loss_of(params, x, y))
        handle.step()
    expected = ref.reference(rank)
    diff = max((params[n].detach() - expected[n].detach()).abs().max().item() for n in ref.SHAPES)
    assert diff < 1e-5 and handle.outer_steps == ref.ROUNDS, diff
    print(f"rank {rank}, {space} memory: CudaDiLoCo against the PyTorch DiLoCo: max difference "
          f"{diff:.3g}")

    ps = device_params(ref.initial_values(rank))
    roles = {"w1": "matrix", "w2": "head", "b1": "vector", "b2": "vector"}
    muloco = _loco.CudaDiLoCo_muloco_nesterov_twobit(
        items(ps, roles), comm, {"inner": {"0": dict(lr=0.02, momentum=0.9), "1": dict(lr=1e-2)},
                                 "schedule": {"every": 4}}, 0)
    muloco.start()
    for step in range(12):
        x, y = ref.batch(rank, step)
        set_grads(ps, ref.loss_of(ps, x, y))
        muloco.step()
    muloco.sync()
    mine = loco._floats(muloco.global_params())  # the raw binding returns bytes
    other = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(other, mine)
    assert torch.equal(other[0], other[1]) and muloco.outer_steps == 4

    # regroup(): rank 1 comes back as a newcomer (other parameters, never started) on a fresh
    # communicator of the same memory space and is healed from rank 0; a communicator of the
    # other space is refused on both ranks first, nothing changed.
    group = dist.new_group(ranks=[0, 1], backend="gloo")
    if space == "host":
        fresh = loco.TorchDistributed(group)
        other_space = _loco.PythonCommunicator(HostViewCollectives(group), rank, 2,
                                               "emulated_nccl", "cuda", 0)
    else:
        fresh = _loco.PythonCommunicator(HostViewCollectives(group), rank, 2, "emulated_nccl",
                                         "cuda", 0)
        other_space = loco.TorchDistributed(group)
    if rank == 1:
        ps = device_params({n: v + 5.0 for n, v in ref.initial_values(7).items()})
        muloco = _loco.CudaDiLoCo_muloco_nesterov_twobit(
            items(ps, roles), fresh, {"inner": {"0": dict(lr=0.02, momentum=0.9),
                                                "1": dict(lr=1e-2)}, "schedule": {"every": 4}}, 0)
    before = {n: p.detach().clone() for n, p in ps.items()}
    try:
        muloco.regroup(other_space)
        raise AssertionError("regroup onto a communicator of the other memory space went through")
    except loco.MemorySpaceError as e:
        assert "regroup onto the same kind" in str(e), str(e)
    assert all(torch.equal(ps[n].detach(), before[n]) for n in ps)
    muloco.regroup(fresh)
    healed = loco._floats(muloco.global_params())
    every = [torch.zeros_like(healed) for _ in range(2)]
    dist.all_gather(every, healed)
    assert torch.equal(every[0], every[1]) and torch.equal(every[0], other[0])
    assert muloco.outer_steps == 4
    if rank == 1:  # the newcomer's parameters are the global ones, bit for bit
        assert torch.equal(torch.cat([ps[n].detach().reshape(-1) for n in ps]), healed)
    for step in range(12, 16):
        x, y = ref.batch(rank, step)
        set_grads(ps, ref.loss_of(ps, x, y))
        muloco.step()
    mine = loco._floats(muloco.global_params())
    dist.all_gather(every, mine)
    assert torch.equal(every[0], every[1]) and muloco.outer_steps == 5
    assert not torch.equal(mine, healed)
    if rank == 0:
        print(f"{space} memory: regroup() healed a newcomer; the next sync agrees on both ranks")

    for case, settings in frontier.CASES.items():
        compressor, outer = settings["compressor"], settings["outer"]
        compress, aggregate = loco._compress_and_aggregate(compressor)
        name = loco._CONFIGS[(loco.AdamW, type(outer), type(compressor), loco.Every)]
        ps = device_params(ref.initial_values(rank))
        handle = getattr(_loco, "Cuda" + name)(
            items(ps), comm, {"inner": dict(lr=ref.INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                                            weight_decay=0.1),
                              "outer": loco._hyper(outer), "schedule": {"every": ref.H},
                              "compress": compress, "aggregate": aggregate}, 0)
        handle.start()
        for step in range(ref.H * ref.ROUNDS):
            x, y = ref.batch(rank, step)
            set_grads(ps, ref.loss_of(ps, x, y))
            handle.step()
        expected, residual = frontier.reference(rank, case)
        diff = max((ps[n].detach() - expected[n].detach()).abs().max().item() for n in ref.SHAPES)
        residual_diff = (loco._floats(handle.compressor_state()) - residual).abs().max().item()
        assert diff < 1e-5 and residual_diff < 1e-5 and handle.outer_steps == ref.ROUNDS, \
            (case, diff, residual_diff)
        if rank == 0:
            print(f"{space} memory: Cuda{name} ({case}) against the PyTorch reference: "
                  f"parameters within {diff:.3g}, residual within {residual_diff:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    assert _loco.has_cuda, "build the module with tests/python/emulated/run.sh"
    print(f"check_cuda_bindings: seed {ref.SEED} (LOCO_TEST_SEED repeats it)")
    optimizers()
    for space in ("host", "cuda"):
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(worker, args=(os.path.join(d, "rendezvous"), space), nprocs=2, join=True)
    print("check_cuda_bindings: passed")
