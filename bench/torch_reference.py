#!/usr/bin/env python3
"""PyTorch's own optimizers on the parameter lists of bench/cuda/kernels.cu and bench/cuda/muon.cu,
timed the same way (CUDA events around each step, median after warm-up, random data), so that
docs/benchmarks.md compares loco with PyTorch measured in the same run on the same GPU.

    python3 bench/torch_reference.py [--out FILE] [--reps 30] [--only adamw,sgd,muon,quant]

Rows:
  torch AdamW(fused=True) fp32       GPT-2 124M and 1.5B (every tensor, as loco's inner step)
  torch SGD(momentum=0.9, nesterov=True, fused=True) fp32   the same lists
  torch.optim.Muon (defaults)        the hidden matrices of GPT-2 124M and 1.5B (bench/cuda/muon.cu)
  2-bit blockwise quantizer + error feedback written in plain PyTorch (block 256, absmax scale,
  round to nearest), the issue's reference for loco's fused encode, on the 1.5B list
Prints one line per row ("torch <what> <list> <ms>") and, with --out, writes each to FILE as soon
as it is measured, so that a crash later in the run (out of memory, an API change) keeps the rows
before it; the exit status then says the run did not finish.
Needs a CUDA device; exits 77 without one.
"""
import argparse
import statistics
import sys

try:
    import torch
except ImportError:  # pragma: no cover - the GPU machine has PyTorch
    print("torch_reference: PyTorch is not installed; nothing to measure")
    sys.exit(77)


def gpt2(d, layers):
    vocab, context = 50257, 1024
    sizes = [(vocab, d), (context, d)]
    for _ in range(layers):
        sizes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                  (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    sizes += [(d,), (d,)]
    return sizes


def hidden(d, layers):
    # The matrices Muon takes (bench/cuda/muon.cu): attention and MLP weights of every layer.
    out = []
    for _ in range(layers):
        out += [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    return out


LISTS = {"gpt2_124M": (768, 12), "gpt2_1.5B": (1600, 48)}


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def make_params(shapes, gen):
    params = []
    for s in shapes:
        p = torch.empty(s, device="cuda").uniform_(-1, 1, generator=gen).requires_grad_()
        p.grad = torch.empty(s, device="cuda").uniform_(-0.05, 0.05, generator=gen)
        params.append(p)
    return params


def optimizer_row(kind, list_name, reps, gen):
    d, layers = LISTS[list_name]
    shapes = hidden(d, layers) if kind == "muon" else gpt2(d, layers)
    params = make_params(shapes, gen)
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    elif kind == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, fused=True)
    else:
        opt = torch.optim.Muon(params)
    ms = median_ms(opt.step, reps)
    del opt, params
    torch.cuda.empty_cache()
    return ms


def quantizer_row(reps, gen, block=256):
    # One flat buffer of the 1.5B list's elements: the reference's view of a pseudo-gradient.
    d, layers = LISTS["gpt2_1.5B"]
    n = sum(int(torch.tensor(s).prod()) for s in gpt2(d, layers))
    n -= n % block
    delta = torch.empty(n, device="cuda").uniform_(-0.05, 0.05, generator=gen)
    residual = torch.zeros(n, device="cuda")
    shifts = torch.arange(0, 8, 2, device="cuda", dtype=torch.uint8)

    def encode():
        residual.add_(delta)
        blocks = residual.view(-1, block)
        scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
        # 2-bit codes {0..3} for the levels {-1, -1/3, 1/3, 1} * scale, round to nearest.
        codes = torch.clamp(torch.round((blocks / scale + 1) * 1.5), 0, 3).to(torch.uint8)
        packed = (codes.view(-1, 4) << shifts).sum(dim=1, dtype=torch.uint8)
        decoded = (codes.float() / 1.5 - 1) * scale
        residual.sub_(decoded.view(-1))
        return packed, scale

    ms = median_ms(encode, reps)
    del delta, residual
    torch.cuda.empty_cache()
    return ms, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="adamw,sgd,muon,quant")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_reference: no CUDA device; nothing to measure")
        return 77
    wanted = set(args.only.split(","))
    gen = torch.Generator(device="cuda")
    gen.manual_seed(12345)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    # Each row goes to --out as soon as it is measured (flushed): a crash keeps the rows before it.
    out = open(args.out, "w") if args.out else None

    def emit(row):
        print(row, flush=True)
        if out:
            out.write(row + "\n")
            out.flush()

    for kind, label in (("adamw", "AdamW(fused) fp32"), ("sgd", "SGD(nesterov, fused) fp32"),
                        ("muon", "Muon (defaults), hidden matrices")):
        if kind not in wanted:
            continue
        if kind == "muon" and not hasattr(torch.optim, "Muon"):
            print("torch_reference: this PyTorch has no torch.optim.Muon; row left out")
            continue
        for list_name in LISTS:
            reps = args.reps if kind != "muon" else max(5, args.reps // 3)
            emit(f"torch {label:<34} {list_name:<10} {optimizer_row(kind, list_name, reps, gen):10.3f} ms")
    if "quant" in wanted:
        ms, n = quantizer_row(args.reps, gen)
        emit(f"torch 2-bit blockwise(256) + EF encode   {n / 1e9:.3f} G elements {ms:10.3f} ms")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
