"""What one loco.DiLoCo.step() costs on the host, for the parameter list of GPT-2 small (124M
parameters in 148 tensors), next to torch.optim.AdamW.step() on the same tensors; and the fixed
cost of a call (148 one-element tensors). docs/pytorch.md quotes its output.

    PYTHONPATH=build/python python3 examples/pytorch/step_overhead.py [--repeat 5]
"""

import argparse
import os
import statistics
import time

import torch

import loco


def gpt2_small_shapes(layers=12, width=768, vocab=50257, context=1024):
    shapes = [("wte", (vocab, width)), ("wpe", (context, width))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [(h + "ln_1.weight", (width,)), (h + "ln_1.bias", (width,)),
                   (h + "attn.c_attn.weight", (width, 3 * width)),
                   (h + "attn.c_attn.bias", (3 * width,)),
                   (h + "attn.c_proj.weight", (width, width)), (h + "attn.c_proj.bias", (width,)),
                   (h + "ln_2.weight", (width,)), (h + "ln_2.bias", (width,)),
                   (h + "mlp.c_fc.weight", (width, 4 * width)), (h + "mlp.c_fc.bias", (4 * width,)),
                   (h + "mlp.c_proj.weight", (4 * width, width)),
                   (h + "mlp.c_proj.bias", (width,))]
    return shapes + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


def make(shapes, tiny=False):
    out = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(1 if tiny else shape) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        out.append((name, p))
    return out


def timed(fn, repeat):
    fn()  # warm up (first touch of the state)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description="The host cost of loco.DiLoCo.step() for GPT-2 "
                                             "small's parameters, next to torch's AdamW.")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    # before the model (124M parameters) is allocated: a median of nothing, or no threads at all
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not 1 <= args.threads <= (cpus or 1):
        ap.error(f"--threads must be between 1 and the {cpus or 1} CPUs here, got {args.threads}")
    torch.set_num_threads(args.threads)
    shapes = gpt2_small_shapes()
    n = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeat}")

    tiny = make(shapes, tiny=True)
    opt = loco.DiLoCo(tiny, loco.Single(), inner=loco.AdamW(), schedule=loco.Every(10**9))
    t = timed(lambda: [opt.step() for _ in range(1000)], 3) / 1000
    print(f"loco.DiLoCo.step(), 148 one-element tensors: {t * 1e6:.1f} us per call")
    t = timed(lambda: [opt._check_grads() for _ in range(1000)], 3) / 1000
    print(f"  of which the Python gradient check: {t * 1e6:.1f} us")

    ps = make(shapes)
    opt = loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(), schedule=loco.Every(10**9))
    t_loco = timed(opt.step, args.repeat)
    print(f"loco.DiLoCo.step(), inner AdamW, no sync: {t_loco * 1e3:.0f} ms")
    sync = loco.DiLoCo(ps, loco.Single(), inner=loco.AdamW(), schedule=loco.Every(1))
    t_sync = timed(sync.step, args.repeat)
    print(f"loco.DiLoCo.step() with a sync (1 worker: delta, outer Nesterov, merge): "
          f"{t_sync * 1e3:.0f} ms")
    del opt, sync
    for foreach in (False, True):
        ref = torch.optim.AdamW([p for _, p in ps], lr=4e-4, betas=(0.9, 0.95),
                                weight_decay=0.1, foreach=foreach)
        t = timed(ref.step, args.repeat)
        print(f"torch.optim.AdamW(foreach={foreach}).step(): {t * 1e3:.0f} ms")
        del ref


if __name__ == "__main__":
    main()
