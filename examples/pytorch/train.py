"""A small byte-level language model in torch.nn, trained by two processes with DiLoCo from loco.

    ./scripts/install-deps && cmake -S . -B build -G Ninja && cmake --build build
    PYTHONPATH=build/python python3 examples/pytorch/train.py            # DiLoCo, 2 workers
    PYTHONPATH=build/python python3 examples/pytorch/train.py --algo muloco --steps 600
    PYTHONPATH=build/python python3 examples/pytorch/train.py --algo sparseloco   # or demo

The corpus is the one examples/gpt trains on (docs/gpt.md): every fortune file of Debian's
`fortunes` package, sorted by name, the first 90% of each for training and the last 10% for
validation; each worker samples windows from its own contiguous share of the training text. The
processes talk through torch.distributed (gloo) via loco.TorchDistributed(). With RANK and
WORLD_SIZE in the environment (a launcher's, or set by hand with MASTER_ADDR and MASTER_PORT:
Debian 12's torchrun 1.13 is broken) the process is that rank; otherwise this script spawns
--workers processes itself. See docs/pytorch.md.
"""

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import loco

FORTUNES = "/usr/share/games/fortunes"
HEADS = 4  # attention heads of ByteLM: --width must be a multiple


def load_fortunes(directory=FORTUNES):
    if not os.path.isdir(directory):
        raise SystemExit(f"train.py: the fortunes corpus is not at {directory}; install it with "
                         "`apt-get install fortunes` (or ./scripts/install-deps)")
    names = sorted(n for n in os.listdir(directory)
                   if not n.endswith((".dat", ".u8"))
                   and os.path.isfile(os.path.join(directory, n))
                   and not os.path.islink(os.path.join(directory, n)))
    train, valid = bytearray(), bytearray()
    for n in names:
        with open(os.path.join(directory, n), "rb") as f:
            text = f.read()
        cut = len(text) - int(len(text) * 0.1)
        train += text[:cut]
        valid += text[cut:]
    return (torch.frombuffer(train, dtype=torch.uint8).long(),
            torch.frombuffer(valid, dtype=torch.uint8).long(), len(names))


class ByteLM(nn.Module):
    """A small causal transformer over bytes."""

    def __init__(self, context, width=64, layers=2, heads=HEADS):
        super().__init__()
        self.tokens = nn.Embedding(256, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x):
        t = x.shape[1]
        h = self.tokens(x) + self.positions(torch.arange(t))
        h = self.blocks(h, mask=self.mask[:t, :t])
        return self.head(self.norm(h))


def roles_of(model):
    """MuLoCo's routing (docs/groups.md): Muon on hidden matrices, AdamW on the rest."""
    roles = {}
    for name, p in model.named_parameters():
        if name.startswith(("tokens.", "positions.")):
            roles[name] = "embedding"
        elif name.startswith("head."):
            roles[name] = "head"
        elif p.dim() == 2:
            roles[name] = "matrix"
        else:
            roles[name] = "vector"
    return roles


def batch(text, context, size, gen):
    starts = torch.randint(0, len(text) - context - 1, (size,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    window = text[idx]
    return window[:, :-1], window[:, 1:]


def evaluate(model, text, context, windows=32):
    starts = torch.linspace(0, len(text) - context - 2, windows).long()
    idx = starts[:, None] + torch.arange(context + 1)
    window = text[idx]
    with torch.no_grad():
        logits = model(window[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1)).item()


def all_reduce_bytes(n, world, rank=0):
    """Bytes `rank` sends in a ring all-reduce of n fp32 values (reduce-scatter, then all-gather),
    as loco's communicators count them (docs/communicators.md): 4 (n + (M - 2) c_r), c_r the
    elements rank r owns; 2 (M - 1) / M * 4n when M divides n."""
    mine = n * (rank + 1) // world - n * rank // world
    return 4 * (n + (world - 2) * mine)


def make_optimizer(args, model, comm):
    if args.algo == "diloco":
        return loco.DiLoCo(model.named_parameters(), comm,
                           inner=loco.AdamW(lr=args.lr, weight_decay=0.1),
                           outer=loco.Nesterov(lr=0.7, momentum=0.9),
                           schedule=loco.Every(args.every))
    if args.algo == "streaming":
        return loco.DiLoCo(model.named_parameters(), comm,
                           inner=loco.AdamW(lr=args.lr, weight_decay=0.1),
                           outer=loco.Nesterov(lr=0.7, momentum=0.9),
                           schedule=loco.Streaming(every=args.every, fragments=2, overlap=1,
                                                   alpha=0.5))
    if args.algo == "sparseloco":
        # templar's settings: top-64 of each 64 x 64 chunk in 2 bits, accumulator decay 0.95,
        # outer SGD at lr 1, each peer clipped to the median norm
        return loco.DiLoCo(model.named_parameters(), comm,
                           inner=loco.AdamW(lr=args.lr, weight_decay=0.1),
                           outer=loco.OuterSGD(lr=1.0),
                           compressor=loco.SparseLoCo(chunk=64, topk=64, bins=4, beta=0.95),
                           schedule=loco.Every(args.every))
    if args.algo == "demo":
        # DeMo's top-32 DCT coefficients of each 64 x 64 chunk in fp32, with the residual decay
        # of 0.9 that docs/study.md found for a residual updated once per sync, outer SGD
        return loco.DiLoCo(model.named_parameters(), comm,
                           inner=loco.AdamW(lr=args.lr, weight_decay=0.1),
                           outer=loco.OuterSGD(lr=1.0),
                           compressor=loco.DeMo(chunk=64, topk=32, decay=0.9),
                           schedule=loco.Every(args.every))
    return loco.DiLoCo(model.named_parameters(), comm,
                       inner=loco.MuonAdamW(loco.Muon(lr=0.02, momentum=0.95, weight_decay=0.01),
                                            loco.AdamW(lr=args.lr, weight_decay=0.1)),
                       outer=loco.Nesterov(lr=0.7, momentum=0.9),
                       compressor=loco.TwoBit(decay=0.9, fold_outer_lr=True),
                       schedule=loco.Every(args.every), roles=roles_of(model))


def run(rank, world, args, init_method):
    torch.set_num_threads(args.threads)
    if init_method is not None:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    train, valid, files = load_fortunes()
    share = len(train) // world
    mine = train[rank * share:(rank + 1) * share]

    torch.manual_seed(args.seed + rank)  # loco gives every worker rank 0's values at start
    model = ByteLM(args.context, args.width, args.layers)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(args, model, loco.TorchDistributed())
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"fortunes: {files} files, {len(train) + len(valid)} bytes; model {params} "
              f"parameters; {args.algo}, {world} workers, H = {args.every}; "
              f"{opt.bytes_per_sync} bytes per sync per worker", flush=True)
        print(f"start: validation loss {evaluate(model, valid, args.context):.3f} "
              f"(uniform bytes: {math.log(256):.3f})", flush=True)

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    began = time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(mine, args.context, args.batch, gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        _, synced = opt.step()
        if rank == 0 and (step % args.log_every == 0 or synced and step % args.every == 0):
            print(f"step {step:5d}  loss {loss.item():.3f}  outer steps {opt.outer_steps}  "
                  f"bytes sent {opt.bytes_sent}  ({time.time() - began:.1f} s)", flush=True)
    # The end of the run. Streaming: flush() applies the exchanges in flight and starts none
    # (docs/schedules.md). Every: sync() the steps since the last sync, unless the last step()
    # just synced: a sync() then would add an outer step on a pseudo-gradient of zero, which
    # still moves the weights by the outer momentum (and sends a whole sync's bytes).
    if args.algo == "streaming":
        opt.flush()
    elif opt.calls % args.every != 0:
        opt.sync()
    if rank == 0:
        print(f"end: validation loss {evaluate(model, valid, args.context):.3f}; "
              f"{opt.bytes_sent} bytes sent by rank 0 in {opt.outer_steps} outer steps "
              f"(data parallel, an fp32 all-reduce of the gradients at each of the {args.steps} "
              f"steps, would send {args.steps * all_reduce_bytes(params, world)} bytes)",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()


def check_args(ap, args, world, launched):
    """Refuses, with the usage line and exit status 2, the values that would train nothing, train
    on NaN, hang or die deep inside torch: counts, sizes, the windows the corpus can hold, and the
    settings this script fixes for loco that the user cannot see (the fragments and overlap of
    --algo streaming). world: --workers, or WORLD_SIZE when launched by torchrun or by hand."""
    for name in ("workers", "steps", "every", "context", "batch", "width", "layers", "threads",
                 "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if world < 1:
        ap.error(f"WORLD_SIZE must be at least 1, got {world}")
    if args.width % HEADS != 0:
        ap.error(f"--width must be a multiple of the {HEADS} attention heads, got {args.width}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr must be finite and above 0, got {args.lr}")
    if args.algo == "streaming" and (args.every % 2 != 0 or args.every < 4):
        # Streaming(fragments=2, overlap=1) below: H a multiple of P = 2, and H / P above tau = 1
        ap.error(f"--every must be even and at least 4 with --algo streaming (2 fragments, "
                 f"overlap 1), got {args.every}")
    if not 0 <= args.seed < 2**32:
        ap.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.threads > (cpus or 1):
        ap.error(f"--threads must be at most the {cpus or 1} CPUs here, got {args.threads}")
    # A training window is context + 1 bytes drawn from a worker's share of the training text, an
    # evaluation window context + 1 bytes of the validation text.
    train, valid, _ = load_fortunes()
    share = len(train) // world
    longest = min(share - 2, len(valid) - 2)
    if longest < 1:
        what = "WORLD_SIZE" if launched else "--workers"
        ap.error(f"{what} must leave each worker a few bytes of the {len(train)} bytes of "
                 f"training text, got {world} workers ({share} bytes each)")
    if args.context > longest:
        ap.error(f"--context must be at most {longest} with {world} workers (each worker's share "
                 f"of the training text is {share} bytes, the validation text {len(valid)}), "
                 f"got {args.context}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", choices=("diloco", "streaming", "muloco", "sparseloco", "demo"),
                    default="diloco")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50, help="H: inner steps per sync")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, or by hand
    check_args(ap, args, int(os.environ["WORLD_SIZE"]) if launched else args.workers, launched)
    if launched:
        dist.init_process_group("gloo")
        run(dist.get_rank(), dist.get_world_size(), args, None)
        return
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(args.workers, args, "file://" + os.path.join(d, "rendezvous")),
                 nprocs=args.workers, join=True)


if __name__ == "__main__":
    main()
