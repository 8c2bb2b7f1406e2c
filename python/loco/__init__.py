"""loco from PyTorch: DiLoCo, Streaming DiLoCo and MuLoCo over torch tensors, in place.

    import loco
    opt = loco.DiLoCo(model.named_parameters(), loco.TorchDistributed(),
                      inner=loco.AdamW(lr=4e-4), outer=loco.Nesterov(lr=0.7, momentum=0.9),
                      schedule=loco.Every(500))
    for batch in data:
        loss = model(batch).backward()
        opt.step()            # inner AdamW step; every 500 calls, the outer sync
        opt.zero_grad()

The optimizer state lives in C++ (python/_loco.cpp, one compiled instantiation of loco::diloco
per configuration; python/_loco_cuda.cu, the same on loco::cuda::diloco for CUDA tensors, when the
module is built with CUDA); parameters and gradients are read and written where torch keeps them,
through DLPack (include/loco/dlpack.hpp). float32 tensors, all on the CPU or all on one GPU. See
docs/pytorch.md.
"""

import contextlib

from dataclasses import dataclass, asdict, field

import torch
import torch.distributed as dist
import torch.utils.dlpack

from . import _loco
from ._loco import (Error, InvalidArgument, ShapeError, MemorySpaceError, NonfiniteError,
                    CommError, WireError, CheckpointError, Single)

__all__ = ["DiLoCo", "Optimizer", "AdamW", "SGD", "Muon", "MuonAdamW", "Nesterov", "OuterAdam",
           "OuterSGD", "SignSGD", "TwoBit", "SparseLoCo", "DeMo", "Every", "Streaming",
           "TorchDistributed", "Single", "Error",
           "InvalidArgument", "ShapeError", "MemorySpaceError", "NonfiniteError", "CommError",
           "WireError", "CheckpointError", "two_bit_round_trip"]


# ---- policies: hyper-parameters with the paper defaults (docs/inner.md, outer.md, ...) ----------

@dataclass
class AdamW:
    """Inner AdamW, as torch.optim.AdamW (decoupled weight decay)."""
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class SGD:
    """Inner SGD, as torch.optim.SGD (nesterov=True needs momentum > 0)."""
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class Muon:
    """Inner Muon on the hidden matrices (loco::inner::muon, docs/inner.md)."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    eps: float = 1e-7
    ns_steps: int = 5
    coefficients: str = "keller_jordan"   # or "muloco"
    adjust_lr: str = "original"           # or "spectral_norm", "match_rms_adamw"


@dataclass
class MuonAdamW:
    """MuLoCo's inner optimizer: Muon on parameters with role "matrix" (or, without a role, 2-D
    parameters), AdamW on everything else (docs/groups.md)."""
    muon: Muon = field(default_factory=Muon)
    adamw: AdamW = field(default_factory=AdamW)


@dataclass
class Nesterov:
    """Outer SGD with Nesterov momentum, as torch.optim.SGD(nesterov=True) on global - mean(local)."""
    lr: float = 0.7
    momentum: float = 0.9


@dataclass
class OuterAdam:
    """Outer Adam (loco::outer::adam): torch.optim.Adam with eps = tau when bias_correction."""
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False


@dataclass
class OuterSGD:
    """Outer SGD without momentum (loco::outer::sgd): global -= lr * aggregate. lr = 1 is plain
    averaging; SparseLoCo's outer step (templar: lr 1)."""
    lr: float = 1.0


@dataclass
class SignSGD:
    """Outer sign-SGD (loco::outer::sign_sgd), DeMo's and DisTrO's apply:
    global = global * (1 - lr * weight_decay) - lr * sign(aggregate)."""
    lr: float = 4e-4
    weight_decay: float = 0.0


@dataclass
class TwoBit:
    """MuLoCo's 2-bit statistical quantizer with error feedback (algorithms.md section 4.3)."""
    decay: float = 0.9
    fold_outer_lr: bool = True
    per: str = "tensor"     # or "row"
    range: float = 6.0


@dataclass
class SparseLoCo:
    """SparseLoCo (templar; loco::compress::sparseloco, docs/compressors.md): an error-feedback
    accumulator e <- beta * e + delta, the top-`topk` cells of each chunk of about chunk x chunk,
    their values in ceil(log2(bins))-bit codes (bins range * sigma / bins wide) decoded to their
    bin's mean, e -= what was sent. The peers' payloads are averaged element by element over the peers that sent each
    element, each peer first scaled down to the median peer norm (clip; loco::aggregate::
    median_norm_clip). Use with OuterSGD (templar: lr 1). indices: "compact" (Elias-Fano) or
    "fixed" (templar's 12-bit indices for 64 x 64 chunks)."""
    chunk: int = 64
    topk: int = 64
    bins: int = 4
    range: float = 6.0
    beta: float = 0.95
    indices: str = "compact"
    clip: bool = True


@dataclass
class DeMo:
    """DeMo / DisTrO (loco::compress::demo, docs/compressors.md): a residual e <- decay * e + delta,
    the top-`topk` DCT-II coefficients of each chunk of about chunk x chunk, fp32 values or (sign)
    one bit each decoding to +-1, e -= what was sent. Each coefficient is averaged over the peers
    that sent it and decoded once (loco::aggregate::scatter_mean). Use with OuterSGD, or SignSGD
    for DeMo's own sign step."""
    chunk: int = 64
    topk: int = 32
    decay: float = 0.999
    sign: bool = False
    indices: str = "compact"


@dataclass
class Every:
    """Sync the whole model every `every` step() calls (DiLoCo's H)."""
    every: int = 500


@dataclass
class Streaming:
    """Streaming DiLoCo: `fragments` fragments, each synced every `every` calls, staggered; an
    exchange travels `overlap` steps; merge weight `alpha` (docs/schedules.md)."""
    every: int = 100
    fragments: int = 4
    overlap: int = 1
    alpha: float = 0.5


# (inner, outer, compressor, schedule) -> the compiled class in _loco (python/bound.hpp), with the
# prefix "Cuda" for the CUDA instantiation.
_CONFIGS = {
    (AdamW, Nesterov, type(None), Every): "DiLoCo_adamw_nesterov",
    (AdamW, Nesterov, type(None), Streaming): "DiLoCo_adamw_nesterov_streaming",
    (MuonAdamW, Nesterov, TwoBit, Every): "DiLoCo_muloco_nesterov_twobit",
    (SGD, OuterAdam, type(None), Every): "DiLoCo_sgd_adam",
    (AdamW, OuterSGD, SparseLoCo, Every): "DiLoCo_adamw_sgd_sparseloco",
    (AdamW, OuterSGD, DeMo, Every): "DiLoCo_adamw_sgd_demo",
    (AdamW, SignSGD, DeMo, Every): "DiLoCo_adamw_signsgd_demo",
}

# Settings of a compressor dataclass that belong to its aggregation (python/bound.hpp reads them
# into the handle's aggregate hyper-parameters).
_AGGREGATE_KEYS = {SparseLoCo: ("clip",)}


def _compiled(name, device):
    """The compiled class `name` for parameters on `device` (CPU or CUDA)."""
    return getattr(_loco, ("Cuda" if device.type == "cuda" else "") + name)


def _stream_of(stream, device):
    """The cudaStream_t (an integer) loco launches on: the given torch.cuda.Stream or integer, else
    torch's current stream on the parameters' GPU; 0 for CPU parameters, which have none."""
    if device.type != "cuda":
        if stream is not None:
            raise InvalidArgument("loco: stream was given but the parameters are on the CPU; "
                                  "leave stream unset for CPU tensors")
        return 0
    if stream is None:
        stream = torch.cuda.current_stream(device)
    if isinstance(stream, torch.cuda.Stream):
        if stream.device != device:
            raise InvalidArgument(f"loco: the stream is on {stream.device} but the parameters are "
                                  f"on {device}; pass a stream of the parameters' GPU")
        return stream.cuda_stream
    if isinstance(stream, int) and stream >= 0:
        return stream
    raise InvalidArgument("loco: stream must be a torch.cuda.Stream or its cuda_stream integer")


def _on(device):
    """Makes the parameters' GPU current while loco allocates and launches (loco's CUDA handles
    use the current device); nothing for CPU parameters."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _describe_configs():
    return "; ".join(f"{i.__name__} + {o.__name__} + {c.__name__ if c is not type(None) else 'None'}"
                     f" + {s.__name__}" for (i, o, c, s) in _CONFIGS)


def _hyper(policy):
    if isinstance(policy, MuonAdamW):
        return {"0": asdict(policy.muon), "1": asdict(policy.adamw)}
    return asdict(policy) if policy is not None else {}


def _compress_and_aggregate(compressor):
    """The compressor's dict and its aggregation's (the keys of _AGGREGATE_KEYS)."""
    compress = _hyper(compressor)
    keys = _AGGREGATE_KEYS.get(type(compressor), ())
    return ({k: v for k, v in compress.items() if k not in keys},
            {k: v for k, v in compress.items() if k in keys})


# ---- parameters ------------------------------------------------------------------------------------

def _negated(t):
    """Whether t carries torch's lazy neg or conj bit (torch._neg_view, x.conj() of a complex x)."""
    return t.is_neg() or t.is_conj()


def _items(named_params, roles):
    """Checks the parameters in Python what DLPack cannot say (gradient present, device, layout),
    then exports value and gradient as DLPack capsules; include/loco/dlpack.hpp checks the rest.
    Returns the capsules, the tensors with the storages bound (_Handle._check_grads) and the
    device."""
    if isinstance(named_params, dict):
        named_params = named_params.items()
    pairs = list(named_params)
    if roles is not None and not isinstance(roles, dict):
        raise InvalidArgument("loco: roles must be a dict {parameter name: role}, got "
                              f"{type(roles).__name__}")
    roles = dict(roles or {})
    items, tensors, device = [], [], None
    for entry in pairs:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], torch.Tensor)):
            raise InvalidArgument("loco: parameters must be (name, tensor) pairs, as "
                                  "model.named_parameters() yields them")
        name, p = entry
        if p.device.type not in ("cpu", "cuda"):
            raise MemorySpaceError(f"loco: parameter '{name}' is on {p.device}, which loco cannot "
                                   "address; move the model to the CPU or a CUDA GPU")
        if p.device.type == "cuda" and not _loco.has_cuda:
            raise MemorySpaceError(f"loco: parameter '{name}' is on {p.device}, but this loco "
                                   "module was built without CUDA; rebuild it where nvcc is found "
                                   "(cmake -DLOCO_ENABLE_CUDA=ON) or keep the model on the CPU")
        if device is None:
            device = p.device
        elif p.device != device:
            raise MemorySpaceError(f"loco: parameter '{name}' is on {p.device} but the first "
                                   f"parameter is on {device}; keep the whole model on one device "
                                   "(model.to(device))")
        if p.grad is None:
            raise InvalidArgument(f"loco: parameter '{name}' has no gradient; run one backward "
                                  "pass or set p.grad = torch.zeros_like(p) before building the "
                                  "optimizer (and leave out parameters with requires_grad=False)")
        if p.layout != torch.strided or p.grad.layout != torch.strided:
            which = "value" if p.layout != torch.strided else "gradient"
            layout = p.layout if p.layout != torch.strided else p.grad.layout
            raise InvalidArgument(f"loco: the {which} of parameter '{name}' is a {layout} tensor "
                                  "but loco needs dense (torch.strided) tensors; build the layer "
                                  "with dense gradients (torch.nn.Embedding(..., sparse=False))")
        if p.grad.device != p.device:
            raise MemorySpaceError(f"loco: the gradient of '{name}' is on {p.grad.device} but the "
                                   f"parameter is on {p.device}; keep each gradient on its "
                                   "parameter's device")
        if p.dtype != torch.float32 or p.grad.dtype != torch.float32:
            bad = p.dtype if p.dtype != torch.float32 else p.grad.dtype
            raise InvalidArgument(f"loco: parameter '{name}' holds {bad} elements but loco needs "
                                  "torch.float32; convert the model with model.float() (keep an "
                                  "fp32 master copy for lower-precision training)")
        if not p.is_contiguous() or not p.grad.is_contiguous():
            which = "value" if not p.is_contiguous() else "gradient"
            raise InvalidArgument(f"loco: the {which} of parameter '{name}' is not contiguous (a "
                                  "transposed or sliced view); pass tensors that own contiguous "
                                  "storage")
        if p.is_inference():
            # torch refuses in-place updates of an inference tensor outside inference mode, but
            # only after loco wrote it (its version counter bump): every step() would write the
            # values and then raise
            raise InvalidArgument(f"loco: parameter '{name}' is an inference tensor (made under "
                                  "torch.inference_mode()), which loco cannot update in place; "
                                  "build the model outside inference mode, or pass p.clone() "
                                  "made outside it")
        if _negated(p) or _negated(p.grad):
            # to_dlpack exports the memory without the bit, so loco would read -x (and could not
            # write the value back negated)
            which = "value" if _negated(p) else "gradient"
            raise InvalidArgument(f"loco: the {which} of parameter '{name}' is a lazily negated "
                                  "or conjugated view (torch's neg or conj bit), whose memory "
                                  "holds other values than the tensor shows; pass tensors "
                                  "without the bit (t.resolve_neg().resolve_conj())")
        role = roles.pop(name, "")
        if not isinstance(role, str):
            raise InvalidArgument(f"loco: the role of parameter '{name}' must be a string "
                                  f"(matrix, vector, embedding or head), got {role!r}")
        items.append((name, torch.utils.dlpack.to_dlpack(p.detach()),
                      torch.utils.dlpack.to_dlpack(p.grad), role))
        tensors.append((name, p, p.grad, p.data_ptr(), p.grad.data_ptr()))
    if roles:
        raise InvalidArgument(f"loco: roles name '{sorted(roles)[0]}', which is not a parameter")
    return items, tensors, device if device is not None else torch.device("cpu")


class _Handle:
    """What DiLoCo and Optimizer share: the parameter bookkeeping and the checkpoint dict."""

    def _bind(self, tensors):
        self._tensors = tensors
        # An empty view of each parameter: it shares the parameter's autograd version counter, so
        # zeroing it (no element) counts as an in-place write of the parameter (_written).
        self._versions = [p.detach().view(-1)[:0] for _, p, _, _, _ in tensors]

    def _check_grads(self):
        """Before every call that reads or writes the tensors: loco holds the storages it was
        built with, so each parameter must still have them (and its gradient tensor)."""
        # Backward writes into the existing .grad; zero_grad(set_to_none=True) or an assignment
        # would leave loco reading a tensor the model no longer uses. p.data = x, model.to(),
        # model.double() or share_memory() give a tensor new storage in place: loco would write
        # the old one (kept alive by its capsule, or freed by share_memory_). A sparse or other
        # layout cannot arrive without either (torch refuses p.data = sparse on a dense tensor).
        for name, p, g, p_ptr, g_ptr in self._tensors:
            if p.grad is not g:
                raise InvalidArgument(f"loco: the gradient tensor of '{name}' was replaced since "
                                      "the optimizer was built; zero gradients in place "
                                      "(opt.zero_grad(), or model.zero_grad(set_to_none=False))")
            if p.data_ptr() != p_ptr or g.data_ptr() != g_ptr:
                t, which = (p, "parameter") if p.data_ptr() != p_ptr else (g, "gradient of")
                raise InvalidArgument(f"loco: the storage of the {which} '{name}' was replaced "
                                      f"since the optimizer was built (now {t.dtype} on "
                                      f"{t.device}: p.data = x, model.to(), model.double() or "
                                      "model.share_memory() do that); move, convert or share the "
                                      "model before building the optimizer")

    def _written(self):
        """After a call that wrote the parameters: bumps their autograd version counters, as
        torch's own in-place updates do, so that backward() through a graph built before the
        write raises instead of using the old values (one call; each view has no element)."""
        if self._versions:
            torch._foreach_zero_(self._versions)

    def zero_grad(self):
        """Zeroes every gradient in place (never sets it to None, see _check_grads)."""
        for _, _, g, _, _ in self._tensors:
            g.zero_()

    def state_dict(self):
        """loco's checkpoint of this worker (bytes, include/loco/detail/checkpoint.hpp) in a dict
        torch.save can write."""
        with _on(self.device):
            saved = self._impl.save()
        return {"format": "loco-checkpoint", "kind": type(self).__name__, "bytes": saved}

    def load_state_dict(self, state):
        if not (isinstance(state, dict) and state.get("format") == "loco-checkpoint"):
            raise CheckpointError("loco: load_state_dict() needs a dict from state_dict() of a loco "
                                  "optimizer")
        saved = state.get("bytes")
        if not isinstance(saved, (bytes, bytearray, memoryview)):
            got = type(saved).__name__ if "bytes" in state else "no 'bytes' key"
            raise CheckpointError("loco: the checkpoint dict's 'bytes' must be the bytes of "
                                  f"state_dict(), got {got}")
        with _on(self.device):
            self._impl.load(bytes(saved))


class DiLoCo(_Handle):
    """loco::diloco over torch parameters (docs/pytorch.md).

    named_params: (name, tensor) pairs (model.named_parameters()), float32, all on the CPU or all
      on one GPU (then loco::cuda::diloco runs), each with a .grad allocated. roles: optional
      {name: "matrix" | "vector" | "embedding" | "head"} for MuLoCo's routing (docs/groups.md).
    comm: loco.TorchDistributed() (torch.distributed: gloo, or NCCL for CUDA tensors), or
      loco.Single() for one worker.
    stream: CUDA tensors only: the stream loco launches on (a torch.cuda.Stream or its
      cuda_stream), by default torch's current stream on the parameters' GPU when built.
    Builds the handle and calls start() (collective): every rank checks that all built the same
    model and sync (the inner optimizer is each worker's own), and takes rank 0's parameters.
    """

    def __init__(self, named_params, comm, inner=None, outer=None, compressor=None,
                 schedule=None, roles=None, seed=0, workers=0, broadcast_initial=True,
                 on_nonfinite="skip", max_skipped_syncs=10, start=True, stream=None):
        inner = AdamW() if inner is None else inner
        outer = Nesterov() if outer is None else outer
        schedule = Every() if schedule is None else schedule
        key = (type(inner), type(outer), type(compressor), type(schedule))
        if key not in _CONFIGS:
            raise InvalidArgument(
                f"loco: no compiled configuration {type(inner).__name__} + {type(outer).__name__}"
                f" + {type(compressor).__name__} + {type(schedule).__name__}; the module has "
                f"{_describe_configs()} (add one in python/_loco.cpp)")
        _check_communicator(comm)
        items, tensors, self.device = _items(named_params, roles)
        self._bind(tensors)
        _check_space(comm, self.device)
        stream = _stream_of(stream, self.device)
        compress, aggregate = _compress_and_aggregate(compressor)
        hyper = {"inner": _hyper(inner), "outer": _hyper(outer), "schedule": _hyper(schedule),
                 "compress": compress, "aggregate": aggregate,
                 "options": {"seed": seed, "workers": workers,
                             "broadcast_initial": broadcast_initial,
                             "on_nonfinite": on_nonfinite,
                             "max_skipped_syncs": max_skipped_syncs}}
        self.comm = comm
        with _on(self.device):
            self._impl = _compiled(_CONFIGS[key], self.device)(items, comm, hyper, stream)
        if start:
            self.start()

    def start(self):
        """Collective, once: checks every rank built the same model and sync (an exception
        naming the first difference otherwise, nothing changed) and gives every worker rank 0's
        parameters. Returns whether this worker's parameters changed."""
        self._check_grads()
        with _on(self.device):
            changed = self._bumping_on_error(self._impl.start)
            if changed:
                self._written()
        return changed

    def step(self):
        """Inner step from the current gradients, then the sync the schedule plans. Returns
        (applied, synced). CUDA tensors: the launches go to the handle's stream, and step() does
        not wait for them (except where a sync needs the values on the host)."""
        self._check_grads()
        with _on(self.device):
            applied, synced, received_initial = self._bumping_on_error(self._impl.step)
            # received_initial: this first call started the run and gave the worker rank 0's
            # parameters (a handle built with start=False).
            if applied or synced or received_initial:
                self._written()
        return applied, synced

    def sync(self):
        """Syncs every fragment now (collective)."""
        self._check_grads()
        with _on(self.device):
            self._bumping_on_error(self._impl.sync)
            self._written()

    def flush(self):
        """Finishes and applies every exchange in flight, starting none (collective): the end of
        a run under the streaming or delayed schedules."""
        self._check_grads()  # it writes the parameters: their storage must be loco's
        with _on(self.device):
            self._bumping_on_error(self._impl.flush)
            self._written()

    def regroup(self, comm, donor=0):
        """Goes on with the workers of `comm` (collective over it; docs/reliability.md): after a
        worker was lost (the survivors' new process group), to take in a newcomer (a DiLoCo built
        with start=False on `comm`, healed from rank `donor` of `comm`: its parameters become the
        global ones), or to bring the ranks back in step after a collective failed on one of them
        (a fresh process group of every rank). Keeps the global parameters, the outer state, the
        schedule and the round counters; survivors keep their own parameters and inner state.
        Raises, changing nothing on any rank, if the ranks were not built alike or the transfer
        fails. Call it while the old communicator's process group still exists."""
        _check_communicator(comm)
        _check_space(comm, self.device)
        if isinstance(donor, bool) or not isinstance(donor, int):
            raise InvalidArgument(f"loco: regroup()'s donor must be a rank (an int), got "
                                  f"{type(donor).__name__}")
        if not 0 <= donor < 2**31:
            raise InvalidArgument(f"loco: the donor rank {donor} is not a rank of the "
                                  "communicator; pick a surviving worker's rank")
        self._check_grads()
        with _on(self.device):
            self._bumping_on_error(lambda: self._impl.regroup(comm, donor))
            self._written()  # a newcomer's parameters became the global ones
        self.comm = comm

    def _bumping_on_error(self, call):
        """Runs call(); if it raises, bumps the version counters before re-raising: a call can
        write the parameters and then fail (a step whose inner update applied before its sync
        failed; a sync() whose first fragment applied before the next failed), and a graph built
        before it must then raise in backward(), not use the new values. (A bump when nothing
        was written only makes such a graph raise.)"""
        try:
            return call()
        except BaseException:
            self._written()
            raise

    def set_lr(self, inner=None, outer=None):
        """Changes the learning rates between steps (a schedule); groups all get `inner`."""
        self._impl.set_lr(inner, outer)  # both checked before either changes

    calls = property(lambda self: self._impl.calls)
    inner_steps = property(lambda self: self._impl.inner_steps)
    outer_steps = property(lambda self: self._impl.outer_steps)
    skipped_steps = property(lambda self: self._impl.skipped_steps)
    skipped_syncs = property(lambda self: self._impl.skipped_syncs)
    fragments = property(lambda self: self._impl.fragments)
    bytes_per_sync = property(lambda self: self._impl.bytes_per_sync,
                              doc="bytes this worker sends per sync of every fragment")
    agreement_bytes_per_sync = property(
        lambda self: self._impl.agreement_bytes_per_sync,
        doc="of bytes_per_sync, what each fragment's all-or-nothing agreement adds")
    fingerprint = property(lambda self: self._impl.fingerprint)

    @property
    def bytes_sent(self):
        """Bytes this worker has sent through its communicator (all handles on it)."""
        return self.comm.bytes_sent

    def global_params(self):
        """The global parameters after the last sync, flat, as a float32 tensor (a copy)."""
        with _on(self.device):
            return _floats(self._impl.global_params())

    def compressor_state(self):
        """The compressor's residual (MuLoCo's error feedback, SparseLoCo's accumulator, DeMo's
        residual), flat in parameter order, as a float32 tensor (a copy)."""
        with _on(self.device):
            return _floats(self._impl.compressor_state())


def _check_communicator(comm):
    if not isinstance(comm, _loco.Communicator):
        raise InvalidArgument("loco: comm must be loco.TorchDistributed() or loco.Single()")


def _check_space(comm, device):
    """An NCCL communicator moves memory of one GPU: the parameters must be there."""
    if comm.space == "cuda" and (device.type != "cuda" or device.index != comm.device):
        raise MemorySpaceError(f"loco: the communicator moves memory of cuda:{comm.device} "
                               f"(NCCL) but the parameters are on {device}; move the model to "
                               "that GPU, or use a gloo process group")


def _floats(raw):
    """A float32 tensor over the bytearray the binding returns (shared, not copied again)."""
    if len(raw) == 0:
        return torch.empty(0, dtype=torch.float32)  # frombuffer refuses an empty buffer
    return torch.frombuffer(raw, dtype=torch.float32)


class Optimizer(_Handle):
    """A bare loco inner optimizer (AdamW or SGD) over torch parameters, without any sync: on the
    CPU, or loco::cuda::optimizer for CUDA tensors (stream as for DiLoCo)."""

    def __init__(self, named_params, policy, stream=None):
        kinds = {AdamW: "Optimizer_adamw", SGD: "Optimizer_sgd"}
        if type(policy) not in kinds:
            raise InvalidArgument("loco: Optimizer takes loco.AdamW(...) or loco.SGD(...)")
        items, tensors, self.device = _items(named_params, None)
        self._bind(tensors)
        stream = _stream_of(stream, self.device)
        with _on(self.device):
            self._impl = _compiled(kinds[type(policy)], self.device)(items, asdict(policy), stream)

    def step(self):
        self._check_grads()
        with _on(self.device):
            applied = self._impl.step()
            if applied:
                self._written()
        return applied

    steps = property(lambda self: self._impl.steps)


def two_bit_round_trip(x, out, rows=0, per_row=False, range=6.0):
    """MuLoCo's 2-bit statistical quantizer (loco::compress::statistical<2>) on one float32 CPU
    tensor: writes decode(encode(x)) into `out` and returns the payload's size in bytes. per_row
    quantizes each of `rows` rows with its own statistics (algorithms.md section 4.3)."""
    for name, t in (("x", x), ("out", out)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise InvalidArgument(f"loco: two_bit_round_trip needs contiguous float32 CPU tensors, "
                                  f"and {name} is {t.dtype} on {t.device}")
        if _negated(t):
            raise InvalidArgument(f"loco: two_bit_round_trip's {name} is a lazily negated view "
                                  "(torch's neg bit); pass t.resolve_neg()")
    # The compiled call takes a std::size_t: a value past it would be pybind11's TypeError.
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows < 2**64:
        raise InvalidArgument(f"loco: two_bit_round_trip's rows must be a whole number >= 0 "
                              f"and below 2**64 (0: the tensor as one group), got {rows!r}")
    return _loco.two_bit_round_trip(torch.utils.dlpack.to_dlpack(x.detach()),
                                    torch.utils.dlpack.to_dlpack(out.detach()), rows, per_row,
                                    range)


# ---- torch.distributed ----------------------------------------------------------------------------

class _TorchCollectives:
    """What the C++ communicator calls: torch.distributed on tensors that wrap loco's buffers
    (DLPack capsules, zero copy). The blocking collectives of the default (or given) group: each
    returns when the result is in loco's buffer.

    device: None for gloo (loco's host buffers), else the GPU of an NCCL group (loco's device
    buffers, capsules of kDLCUDA). torch runs NCCL's kernels on a stream of its own: the work
    waits (async_op=False, or Work.wait()) only enqueue a dependency of torch's current stream on
    it, and loco then reads the buffer on its own stream, which knows nothing of either. So around
    every collective the GPU is synchronised: before, so that NCCL reads what loco's stream and
    its staging copies wrote; after (with the current stream, which waited for the NCCL stream
    and ran the division of the mean), so that the result is complete when loco's stream reads it.
    A sync is a round of loco's outer loop, not an inner step: the stall costs little next to the
    collective itself."""

    def __init__(self, group, device=None):
        self.group = group
        self.device = device

    @staticmethod
    def _wrap(capsule):
        return torch.utils.dlpack.from_dlpack(capsule)

    def _before(self):
        if self.device is not None:
            torch.cuda.synchronize(self.device)

    def _after(self, work=None):
        if work is not None:
            work.wait()
        if self.device is not None:
            torch.cuda.current_stream(self.device).synchronize()

    def all_reduce(self, capsule, mean):
        t = self._wrap(capsule)
        self._before()
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        work.wait()
        if mean:
            t.div_(dist.get_world_size(self.group))
        self._after()

    def all_gather(self, send, recv):
        s, r = self._wrap(send), self._wrap(recv)
        self._before()
        self._after(dist.all_gather(list(r.chunk(dist.get_world_size(self.group))), s.clone(),
                                    group=self.group, async_op=True))

    def all_to_all(self, send, recv):
        s, r = self._wrap(send), self._wrap(recv)
        self._before()
        self._after(dist.all_to_all_single(r, s, group=self.group, async_op=True))

    def broadcast(self, capsule, root):
        t = self._wrap(capsule)
        self._before()
        self._after(dist.broadcast(t, src=dist.get_global_rank(self.group, root)
                                   if self.group is not None else root, group=self.group,
                                   async_op=True))

    def barrier(self):
        self._before()
        if self.device is not None:
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)
        self._after()


def TorchDistributed(group=None):
    """A loco communicator over torch.distributed (initialise the process group first): over gloo
    it moves host memory (CPU tensors; for CUDA tensors loco stages its exchanges through the
    host), over NCCL ("nccl" backend) it moves GPU memory of the current device
    (torch.cuda.set_device(local_rank) first), and the parameters must be CUDA tensors there.
    Counts the bytes it sends as the other loco communicators do. A collective that fails on this
    rank leaves the communicator refusing every later one (CommError, torch.distributed not
    called): build a new process group and communicator and regroup() onto it to go on. A
    KeyboardInterrupt or SystemExit raised inside a collective reaches the caller of step(),
    sync(), flush(), start() or regroup() as itself (docs/pytorch.md)."""
    if not dist.is_available() or not dist.is_initialized():
        raise CommError("loco: torch.distributed is not initialised; call "
                        "torch.distributed.init_process_group('gloo', ...) first")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    if rank < 0:
        raise CommError("loco: this process is not in the given process group; build "
                        "loco.TorchDistributed(group) only on the group's ranks")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        return _loco.PythonCommunicator(_TorchCollectives(group, device), rank, size,
                                        "torch_distributed", "cuda", device.index)
    return _loco.PythonCommunicator(_TorchCollectives(group), rank, size, "torch_distributed")
