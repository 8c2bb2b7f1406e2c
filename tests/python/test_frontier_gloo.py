"""loco.DiLoCo with SparseLoCo and DeMo over torch.distributed (gloo, two processes) against the
references' rules written here in plain PyTorch, from their papers' code as docs/compressors.md
states it (templar's src/tplr/compress.py and neurons.py; bloc97/DeMo demo.py and Psyche's
distro.rs):

- chunks: a matrix rows x cols is cut into h x w chunks, h and w the largest divisors of rows
  and cols not above the target (a 1-D tensor into flat chunks of w), ordered by block row then
  block column, each chunk row-major ("(y h) (x w) -> y x h w");
- SparseLoCo: e <- beta e + delta; the k largest |e| of each chunk (k = min(topk, cells), at
  least 2, even); their values quantized together per tensor: shift = mean, scale = range *
  std / bins, code = round-half-even(clamp((v - shift) / scale + bins / 2, 0, bins - 1)), each
  code decoding to its bin's mean plus shift; e <- e - decoded. Receivers scale each peer down
  to the lower-median peer norm (per tensor) and average each element over the peers that sent
  it; outer torch.optim.SGD;
- DeMo: e <- decay e + delta; orthonormal DCT-II of each chunk (the basis built from its cosine
  formula, sums in float64 in compress/dct.hpp's order, see dct() below); the k largest |coefficients| (k = min(topk, cells)), fp32 or their signs
  (+-1); e <- e - inverse DCT of what was sent. Receivers average each coefficient over the
  peers that sent it, one inverse DCT; outer torch.optim.SGD, or DeMo's sign step (p *= 1 - lr
  wd, then SGD on the sign).

Each process trains the same small model as tests/python/test_diloco_gloo.py on its own data for
5 rounds of 4 inner AdamW steps. loco's parameters and its residual (compressor_state()) must
equal the reference's within 1e-5, and a handle resumed from a state_dict() of round 3 must end
bit for bit where the run ended. The bytes each sync sends must equal the payload formula of
docs/compressors.md plus the agreement, the communicator's count must equal them, and bad
settings are refused with one sentence, nothing changed.
"""

import math
import os
import sys
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loco  # noqa: E402
import test_diloco_gloo as base  # noqa: E402  (seed, model, data; LOCO_TEST_SEED repeats a run)

WORLD = base.WORLD
H = base.H
ROUNDS = base.ROUNDS
SHAPES = base.SHAPES  # w1 16 x 6, b1 16, w2 3 x 16, b2 3: with target 4, chunks of 4 x 3, 4,
#                       3 x 4 and one of 3 cells (where SparseLoCo keeps 2 and DeMo every cell)
INNER = base.INNER

# The configurations under test: (name, compressor, outer, torch outer step).
CASES = {
    "sparseloco": dict(compressor=loco.SparseLoCo(chunk=4, topk=4, beta=0.9, indices="fixed"),
                       outer=loco.OuterSGD(lr=0.8)),
    "sparseloco-3bit-noclip": dict(
        compressor=loco.SparseLoCo(chunk=4, topk=6, bins=8, range=5.0, beta=0.5, clip=False),
        outer=loco.OuterSGD(lr=1.0)),
    "demo": dict(compressor=loco.DeMo(chunk=4, topk=3, decay=0.9), outer=loco.OuterSGD(lr=1.0)),
    "demo-sign": dict(compressor=loco.DeMo(chunk=4, topk=3, decay=0.999, sign=True,
                                           indices="fixed"),
                      outer=loco.SignSGD(lr=0.01, weight_decay=0.1)),
}


# ---- chunks and the DCT ------------------------------------------------------------------------

def side(n, target):
    """The largest divisor of n that is <= target (n itself when n <= target)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= target)


def chunk_shape(shape, target):
    if len(shape) == 1:
        return 1, side(shape[0], target)
    return side(shape[0], target), side(shape[1], target)


def to_chunks(x, target):
    """x as a (chunks, h * w) matrix, one chunk per row, in the references' order."""
    h, w = chunk_shape(tuple(x.shape), target)
    if x.dim() == 1:
        return x.reshape(-1, w)
    rows, cols = x.shape
    return x.reshape(rows // h, h, cols // w, w).permute(0, 2, 1, 3).reshape(-1, h * w)


def from_chunks(c, shape, target):
    h, w = chunk_shape(shape, target)
    if len(shape) == 1:
        return c.reshape(shape)
    rows, cols = shape
    return c.reshape(rows // h, cols // w, h, w).permute(0, 2, 1, 3).reshape(shape)


def dct_basis(n):
    """F[i][k] = c_k cos(pi (2 i + 1) k / (2 n)), c_0 = sqrt(1/n), c_k = sqrt(2/n): orthonormal.
    In Python's float64 arithmetic and its libm cosine, the expression as compress/dct.hpp
    writes it."""
    f = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k in range(n):
            c = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
            f[i, k] = c * math.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n))
    return f


# The two products of a chunk's transform in float64, each sum adding its terms one at a time in
# the order compress/dct.hpp defines, the result rounded to fp32 once. The order matters for
# DeMo's sign variant: an averaged coefficient pattern can make an element of the inverse DCT
# zero in exact arithmetic, and the sign step then moves it by +-lr on the sign of the rounding.
# Any fixed order is as right as another; the reference has to round as loco does to compare.

def dct(c, hw):
    """Each chunk's coefficients C[b][d] = sum_r Fh[r][b] (sum_c X[r][c] Fw[c][d])."""
    h, w = hw
    fh, fw = dct_basis(h), dct_basis(w)
    x = c.double().reshape(-1, h, w)
    t = torch.zeros_like(x)
    for col in range(w):
        t = t + x[:, :, col:col + 1] * fw[col, :]
    out = torch.zeros_like(x)
    for r in range(h):
        out = out + fh[r, :].view(1, h, 1) * t[:, r:r + 1, :]
    return out.reshape(c.shape).float()


def idct(coef, hw):
    """Each chunk from its coefficients: X[r][c] = sum_b Fh[r][b] (sum_d C[b][d] Fw[c][d])."""
    h, w = hw
    fh, fw = dct_basis(h), dct_basis(w)
    x = coef.double().reshape(-1, h, w)
    t = torch.zeros_like(x)
    for d in range(w):
        t = t + x[:, :, d:d + 1] * fw[:, d]
    out = torch.zeros_like(x)
    for b in range(h):
        out = out + fh[:, b].view(1, h, 1) * t[:, b:b + 1, :]
    return out.reshape(coef.shape).float()


def top_mask(c, k):
    """The k cells of largest magnitude in each row of c."""
    idx = torch.topk(c.abs(), k, dim=1).indices
    return torch.zeros_like(c, dtype=torch.bool).scatter_(1, idx, True)


# ---- the compressors ---------------------------------------------------------------------------

def sparseloco_k(topk, cells):
    if cells == 1:
        return 1
    k = max(min(topk, cells), 2)
    return k - k % 2


def sparseloco_encode(s, e, shape):
    """Templar's compress + decompress of the accumulator e (already beta e + delta): the decoded
    tensor and the mask of the cells sent."""
    c = to_chunks(e, s.chunk)
    mask = top_mask(c, sparseloco_k(s.topk, c.shape[1]))
    v = c[mask]
    v64 = v.double()
    n = v.numel()
    shift = (v64.sum() / n).float()
    scale = torch.tensor(1.0)
    if n >= 2:
        centred = v64 - shift.double()
        scale = (s.range * torch.sqrt((centred * centred).sum() / (n - 1)) / s.bins).float()
        if scale.item() == 0.0 or not math.isfinite(scale.item()):
            scale = torch.tensor(1.0)
    t = ((v - shift) / scale + float(s.bins // 2)).clamp(0, s.bins - 1)
    q = torch.round(t).long()  # half to even, as torch.round
    lut = torch.zeros(s.bins)
    for b in range(s.bins):
        if (q == b).any():
            lut[b] = (v64[q == b] - shift.double()).mean().float()
    decoded = torch.zeros_like(c)
    decoded[mask] = lut[q] + shift
    return from_chunks(decoded, shape, s.chunk), from_chunks(mask, shape, s.chunk)


def demo_encode(s, e, shape):
    """DeMo's compress + decompress of the residual e (already decay e + delta): the sent
    coefficients (chunked, 0 elsewhere), their mask, and the decoded tensor."""
    c = to_chunks(e, s.chunk)
    hw = chunk_shape(shape, s.chunk)
    coef = dct(c, hw)
    mask = top_mask(coef, min(max(s.topk, 1), coef.shape[1]))
    values = torch.where(torch.signbit(coef), -1.0, 1.0) if s.sign else coef
    sent = torch.where(mask, values, torch.zeros_like(coef))
    return sent, mask, from_chunks(idct(sent, hw), shape, s.chunk)


def gather(t, group=None):
    out = [torch.zeros_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def median_norm_scatter_mean(decoded, sent, clip, group, eps=1e-8):
    """Templar's batch_decompress(clip_norm) + scatter-mean, for one tensor."""
    ds = gather(decoded, group)
    masks = [m.bool() for m in gather(sent.float(), group)]
    factors = [torch.tensor(1.0)] * WORLD
    if clip:
        norms = [torch.sqrt((d.double() ** 2).sum()).float() for d in ds]
        median = sorted(norms)[(WORLD - 1) // 2]
        factors = [torch.clamp(median / (n + torch.tensor(eps)), max=1.0) for n in norms]
    out = torch.zeros_like(decoded)
    count = torch.zeros_like(decoded)
    for d, m, f in zip(ds, masks, factors):  # rank order
        out = torch.where(m, out + d * f, out)
        count += m.float()
    return torch.where(count > 0, out / count.clamp(min=1), torch.zeros_like(out))


def coefficient_scatter_mean(sent, mask, shape, target, group):
    """DeMo's aggregation: each coefficient averaged over the peers that sent it, one inverse DCT."""
    total = torch.zeros_like(sent, dtype=torch.float64)
    count = torch.zeros_like(sent, dtype=torch.float64)
    for s, m in zip(gather(sent, group), gather(mask.float(), group)):
        total += torch.where(m.bool(), s.double(), torch.zeros_like(total))
        count += m.double()
    coef = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()
    return from_chunks(idct(coef, chunk_shape(shape, target)), shape, target)


# ---- the reference run -------------------------------------------------------------------------

def reference(rank, case, group=None):
    """The case's run in plain PyTorch: every worker starts from rank 0's values. Returns the
    parameters and the residual (flat, parameter order). `group`: a gloo group for these CPU
    tensors when the default one is NCCL (tests/python/test_cuda.py)."""
    compressor, outer_policy = CASES[case]["compressor"], CASES[case]["outer"]
    local = {n: torch.nn.Parameter(v.clone()) for n, v in base.initial_values(0).items()}
    glob = {n: torch.nn.Parameter(v.clone()) for n, v in base.initial_values(0).items()}
    residual = {n: torch.zeros(s) for n, s in SHAPES.items()}
    inner = torch.optim.AdamW(local.values(), **INNER)
    outer = torch.optim.SGD(glob.values(), lr=outer_policy.lr)
    for step in range(H * ROUNDS):
        inner.zero_grad()
        x, y = base.batch(rank, step)
        base.loss_of(local, x, y).backward()
        inner.step()
        if (step + 1) % H != 0:
            continue
        for n, shape in SHAPES.items():
            delta = (glob[n] - local[n]).detach()
            if isinstance(compressor, loco.SparseLoCo):
                e = residual[n] * compressor.beta + delta
                decoded, sent = sparseloco_encode(compressor, e, shape)
                aggregate = median_norm_scatter_mean(decoded, sent, compressor.clip, group)
            else:
                e = residual[n] * compressor.decay + delta
                coef, mask, decoded = demo_encode(compressor, e, shape)
                aggregate = coefficient_scatter_mean(coef, mask, shape, compressor.chunk, group)
            residual[n] = e - decoded
            if isinstance(outer_policy, loco.SignSGD):
                with torch.no_grad():  # demo.py: decoupled weight decay, then SGD on the sign
                    glob[n].mul_(1 - outer_policy.lr * outer_policy.weight_decay)
                glob[n].grad = torch.sign(aggregate)
            else:
                glob[n].grad = aggregate
        outer.step()
        with torch.no_grad():
            for n in SHAPES:
                local[n].copy_(glob[n])
    return local, torch.cat([residual[n].reshape(-1) for n in SHAPES])


# ---- bytes: docs/compressors.md ----------------------------------------------------------------

def index_bits(compressor, k, cells):
    fixed = k * (cells - 1).bit_length() if cells > 1 else 0
    if compressor.indices == "fixed":
        return fixed
    if k == cells:
        return 0
    low = (cells // k).bit_length() - 1
    return min(k * low + k + ((cells - 1) >> low), fixed)


def words(bits):
    """Bytes of a bit stream padded to a multiple of 4 bytes."""
    return 4 * math.ceil(math.ceil(bits / 8) / 4)


def payload_bytes(compressor):
    total = 40  # the wire header
    for shape in SHAPES.values():
        h, w = chunk_shape(shape, compressor.chunk)
        cells = h * w
        chunks = math.prod(shape) // cells
        if isinstance(compressor, loco.SparseLoCo):
            k = sparseloco_k(compressor.topk, cells)
            code_bits = (compressor.bins - 1).bit_length()
            total += 4 * (1 + compressor.bins) + words(chunks * index_bits(compressor, k, cells)) \
                + words(chunks * k * code_bits)
        else:
            k = min(max(compressor.topk, 1), cells)
            total += words(chunks * index_bits(compressor, k, cells)) \
                + (words(chunks * k) if compressor.sign else 4 * chunks * k)
    return total


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def one_sentence(msg):
    return msg.startswith("loco") and msg.count(". ") == 0


def docs_examples(rank):
    """The examples of docs/pytorch.md on a torch.nn model: each runs two syncs, the ranks end
    with the same global parameters, and the payloads are smaller than fp32."""
    def model_and_data():
        torch.manual_seed(base.SEED + rank)  # start() gives every rank rank 0's values
        model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 3))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, [base.batch(rank, step) for step in range(100)]

    def train_and_check(opt, model, data, what):
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        mine = opt.global_params()
        check(opt.outer_steps == 2 and torch.equal(gather(mine)[0], gather(mine)[1]),
              f"{what}: {opt.outer_steps} outer steps, or the ranks differ")
        fp32 = 4 * sum(p.numel() for p in model.parameters())
        check(opt.bytes_per_sync - opt.agreement_bytes_per_sync < fp32, f"{what}: bytes")

    model, data = model_and_data()
    # [snippet:pytorch_sparseloco]
    opt = loco.DiLoCo(model.named_parameters(), loco.TorchDistributed(),
                      inner=loco.AdamW(lr=3e-3), outer=loco.OuterSGD(lr=1.0),
                      compressor=loco.SparseLoCo(chunk=64, topk=64, bins=4, beta=0.95),
                      schedule=loco.Every(50))
    # [snippet:pytorch_sparseloco end]
    train_and_check(opt, model, data, "SparseLoCo example")
    model, data = model_and_data()
    # [snippet:pytorch_demo_signs]
    opt = loco.DiLoCo(model.named_parameters(), loco.TorchDistributed(),
                      inner=loco.AdamW(lr=3e-3), outer=loco.SignSGD(lr=4e-4),
                      compressor=loco.DeMo(chunk=64, topk=32, sign=True),
                      schedule=loco.Every(50))
    # [snippet:pytorch_demo_signs end]
    train_and_check(opt, model, data, "DeMo example")


def worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD)
    comm = loco.TorchDistributed()
    inner = loco.AdamW(lr=INNER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    total = sum(math.prod(s) for s in SHAPES.values())

    for case, settings in CASES.items():
        params = base.model_params(rank)
        sent_before = comm.bytes_sent
        opt = loco.DiLoCo(params.items(), comm, inner=inner, schedule=loco.Every(H), **settings)
        base.train(opt, params, rank, 0, H * 3)
        saved_state = opt.state_dict()
        saved_params = {n: p.detach().clone() for n, p in params.items()}
        base.train(opt, params, rank, H * 3, H * ROUNDS)
        ref_params, ref_residual = reference(rank, case)
        diff = max((params[n] - ref_params[n]).abs().max().item() for n in SHAPES)
        residual_diff = (opt.compressor_state() - ref_residual).abs().max().item()
        check(diff < 1e-5, f"rank {rank}, {case}: loco and the PyTorch reference differ by {diff}")
        check(residual_diff < 1e-5,
              f"rank {rank}, {case}: the residuals differ by {residual_diff}")
        moved = max((params[n] - base.initial_values(0)[n]).abs().max().item() for n in SHAPES)
        check(moved > 1e-2, f"rank {rank}, {case}: the parameters barely moved ({moved})")
        check(ref_residual.abs().max().item() > 1e-3, f"{case}: the residual stayed empty")
        check(opt.outer_steps == ROUNDS, f"{case}: {opt.outer_steps} outer steps")

        # Bytes: the payload formula for the one peer, the agreement, and the communicator's
        # count over the start (fingerprint, rank 0's broadcast) and the syncs.
        payload = payload_bytes(settings["compressor"])
        check(opt.bytes_per_sync - opt.agreement_bytes_per_sync == (WORLD - 1) * payload,
              f"{case}: {opt.bytes_per_sync} bytes per sync, of which "
              f"{opt.agreement_bytes_per_sync} agreement; the formula gives {payload} per payload")
        sent = comm.bytes_sent - sent_before
        expected = opt._impl.fingerprint_bytes + (4 * total if rank == 0 else 0) \
            + ROUNDS * opt.bytes_per_sync
        check(sent == expected, f"rank {rank}, {case}: sent {sent} bytes, expected {expected}")
        check(opt.bytes_per_sync < 4 * total, f"{case}: {opt.bytes_per_sync} bytes per sync")
        # state_dict() holds the residual: a fresh handle resumed from round 3 ends bit for bit
        # where the run ended.
        ended = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved_params[n])
        resumed = loco.DiLoCo(params.items(), comm, inner=inner, schedule=loco.Every(H),
                              start=False, **settings)
        resumed.load_state_dict(saved_state)
        base.train(resumed, params, rank, H * 3, H * ROUNDS)
        check(all(torch.equal(params[n].detach(), ended[n]) for n in SHAPES)
              and torch.equal(resumed.compressor_state(), opt.compressor_state()),
              f"rank {rank}, {case}: the resumed run differs")
        if rank == 0:
            print(f"{case}: parameters within {diff:.2g}, residual within {residual_diff:.2g} of "
                  f"the PyTorch reference; {opt.bytes_per_sync} bytes per sync "
                  f"({payload} payload)")

    docs_examples(rank)

    # ---- bad settings: one sentence each, the parameters untouched -----------------------------
    params = base.model_params(rank)
    before = {n: p.detach().clone() for n, p in params.items()}
    bad = [
        (dict(compressor=loco.SparseLoCo(topk=0), outer=loco.OuterSGD()), "topk"),
        (dict(compressor=loco.SparseLoCo(chunk=2, topk=5), outer=loco.OuterSGD()), "topk"),
        (dict(compressor=loco.SparseLoCo(beta=1.0), outer=loco.OuterSGD()), "beta"),
        (dict(compressor=loco.SparseLoCo(indices="huffman"), outer=loco.OuterSGD()), "indices"),
        (dict(compressor=loco.DeMo(decay=-0.1), outer=loco.SignSGD()), "decay"),
        (dict(compressor=loco.DeMo(), outer=loco.SignSGD(lr=-1.0)), "lr"),
    ]
    for settings, word in bad:
        try:
            loco.DiLoCo(params.items(), comm, inner=inner, schedule=loco.Every(H), **settings)
            raise AssertionError(f"{settings} was accepted")
        except loco.InvalidArgument as e:
            msg = str(e)
            check(word in msg and one_sentence(msg), f"{settings}: {msg}")
    try:
        loco.DiLoCo(params.items(), comm, inner=inner, compressor=loco.SparseLoCo(),
                    outer=loco.Nesterov())
        raise AssertionError("SparseLoCo under Nesterov has no compiled configuration")
    except loco.InvalidArgument as e:
        check("no compiled configuration" in str(e) and "SparseLoCo" in str(e), str(e))
    for n, p in params.items():
        check(torch.equal(p.detach(), before[n]), f"rank {rank}: '{n}' changed")
    dist.barrier()
    dist.destroy_process_group()


class GlooFrontier(unittest.TestCase):
    def test_two_processes(self):
        print(f"test_frontier_gloo: seed {base.SEED} (LOCO_TEST_SEED={base.SEED} repeats this run)")
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(worker, args=(os.path.join(d, "rendezvous"),), nprocs=WORLD, join=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
