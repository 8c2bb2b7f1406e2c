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
per configuration); parameters and gradients are read and written where torch keeps them, through
DLPack (include/loco/dlpack.hpp). CPU float32 tensors only for now. See docs/pytorch.md.
"""

from dataclasses import dataclass, asdict, field
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.utils.dlpack

from . import _loco
from ._loco import (Error, InvalidArgument, ShapeError, MemorySpaceError, NonfiniteError,
                    CommError, WireError, CheckpointError, Single)

__all__ = ["DiLoCo", "Optimizer", "AdamW", "SGD", "Muon", "MuonAdamW", "Nesterov", "OuterAdam",
           "TwoBit", "Every", "Streaming", "TorchDistributed", "Single", "Error",
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
class TwoBit:
    """MuLoCo's 2-bit statistical quantizer with error feedback (algorithms.md section 4.3)."""
    decay: float = 0.9
    fold_outer_lr: bool = True
    per: str = "tensor"     # or "row"
    range: float = 6.0


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


# (inner, outer, compressor, schedule) -> the compiled class in _loco.
_CONFIGS = {
    (AdamW, Nesterov, type(None), Every): _loco.DiLoCo_adamw_nesterov,
    (AdamW, Nesterov, type(None), Streaming): _loco.DiLoCo_adamw_nesterov_streaming,
    (MuonAdamW, Nesterov, TwoBit, Every): _loco.DiLoCo_muloco_nesterov_twobit,
    (SGD, OuterAdam, type(None), Every): _loco.DiLoCo_sgd_adam,
}


def _describe_configs():
    return "; ".join(f"{i.__name__} + {o.__name__} + {c.__name__ if c is not type(None) else 'None'}"
                     f" + {s.__name__}" for (i, o, c, s) in _CONFIGS)


def _hyper(policy):
    if isinstance(policy, MuonAdamW):
        return {"0": asdict(policy.muon), "1": asdict(policy.adamw)}
    return asdict(policy) if policy is not None else {}


# ---- parameters ------------------------------------------------------------------------------------

def _items(named_params, roles):
    """Checks the parameters in Python what DLPack cannot say (gradient present, device), then
    exports value and gradient as DLPack capsules; include/loco/dlpack.hpp checks the rest."""
    if isinstance(named_params, dict):
        named_params = named_params.items()
    pairs = list(named_params)
    roles = dict(roles or {})
    items, tensors = [], []
    for entry in pairs:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], torch.Tensor)):
            raise InvalidArgument("loco: parameters must be (name, tensor) pairs, as "
                                  "model.named_parameters() yields them")
        name, p = entry
        if p.device.type != "cpu":
            raise MemorySpaceError(f"loco: parameter '{name}' is on {p.device}, but the Python "
                                   "module runs on CPU tensors only for now; keep the model on "
                                   "the CPU (CUDA tensors will follow, see docs/pytorch.md)")
        if p.grad is None:
            raise InvalidArgument(f"loco: parameter '{name}' has no gradient; run one backward "
                                  "pass or set p.grad = torch.zeros_like(p) before building the "
                                  "optimizer (and leave out parameters with requires_grad=False)")
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
        role = roles.pop(name, "")
        items.append((name, torch.utils.dlpack.to_dlpack(p.detach()),
                      torch.utils.dlpack.to_dlpack(p.grad), role))
        tensors.append((name, p, p.grad))
    if roles:
        raise InvalidArgument(f"loco: roles name '{sorted(roles)[0]}', which is not a parameter")
    return items, tensors


class _Handle:
    """What DiLoCo and Optimizer share: the parameter bookkeeping and the checkpoint dict."""

    def _check_grads(self):
        # Backward writes into the existing .grad; zero_grad(set_to_none=True) or an assignment
        # would leave loco reading a tensor the model no longer uses.
        for name, p, g in self._tensors:
            if p.grad is not g:
                raise InvalidArgument(f"loco: the gradient tensor of '{name}' was replaced since "
                                      "the optimizer was built; zero gradients in place "
                                      "(opt.zero_grad(), or model.zero_grad(set_to_none=False))")

    def zero_grad(self):
        """Zeroes every gradient in place (never sets it to None, see _check_grads)."""
        for _, _, g in self._tensors:
            g.zero_()

    def state_dict(self):
        """loco's checkpoint of this worker (bytes, include/loco/detail/checkpoint.hpp) in a dict
        torch.save can write."""
        return {"format": "loco-checkpoint", "kind": type(self).__name__,
                "bytes": self._impl.save()}

    def load_state_dict(self, state):
        if not (isinstance(state, dict) and state.get("format") == "loco-checkpoint"):
            raise CheckpointError("loco: load_state_dict() needs a dict from state_dict() of a loco "
                                  "optimizer")
        self._impl.load(bytes(state["bytes"]))


class DiLoCo(_Handle):
    """loco::diloco over torch parameters (docs/pytorch.md).

    named_params: (name, tensor) pairs (model.named_parameters()), float32, on the CPU, each with
      a .grad allocated. roles: optional {name: "matrix" | "vector" | "embedding" | "head"} for
      MuLoCo's routing (docs/groups.md).
    comm: loco.TorchDistributed() (torch.distributed, gloo), or loco.Single() for one worker.
    Builds the handle and calls start() (collective): every rank checks that all built the same
    model and policies, and takes rank 0's parameters.
    """

    def __init__(self, named_params, comm, inner=None, outer=None, compressor=None,
                 schedule=None, roles=None, seed=0, workers=0, broadcast_initial=True,
                 on_nonfinite="skip", max_skipped_syncs=10, start=True):
        inner = AdamW() if inner is None else inner
        outer = Nesterov() if outer is None else outer
        schedule = Every() if schedule is None else schedule
        key = (type(inner), type(outer), type(compressor), type(schedule))
        if key not in _CONFIGS:
            raise InvalidArgument(
                f"loco: no compiled configuration {type(inner).__name__} + {type(outer).__name__}"
                f" + {type(compressor).__name__} + {type(schedule).__name__}; the module has "
                f"{_describe_configs()} (add one in python/_loco.cpp)")
        if not isinstance(comm, _loco.Communicator):
            raise InvalidArgument("loco: comm must be loco.TorchDistributed() or loco.Single()")
        items, self._tensors = _items(named_params, roles)
        hyper = {"inner": _hyper(inner), "outer": _hyper(outer), "schedule": _hyper(schedule),
                 "compress": _hyper(compressor),
                 "options": {"seed": seed, "workers": workers,
                             "broadcast_initial": broadcast_initial,
                             "on_nonfinite": on_nonfinite,
                             "max_skipped_syncs": max_skipped_syncs}}
        self.comm = comm
        self._impl = _CONFIGS[key](items, comm, hyper)
        if start:
            self.start()

    def start(self):
        """Collective, once: checks every rank built the same model and policies (an exception
        naming the first difference otherwise, nothing changed) and gives every worker rank 0's
        parameters. Returns whether this worker's parameters changed."""
        return self._impl.start()

    def step(self):
        """Inner step from the current gradients, then the sync the schedule plans. Returns
        (applied, synced)."""
        self._check_grads()
        return self._impl.step()

    def sync(self):
        """Syncs every fragment now (collective)."""
        self._impl.sync()

    def set_lr(self, inner=None, outer=None):
        """Changes the learning rates between steps (a schedule); groups all get `inner`."""
        if inner is not None:
            self._impl.set_inner_lr(inner)
        if outer is not None:
            self._impl.set_outer_lr(outer)

    calls = property(lambda self: self._impl.calls)
    inner_steps = property(lambda self: self._impl.inner_steps)
    outer_steps = property(lambda self: self._impl.outer_steps)
    skipped_steps = property(lambda self: self._impl.skipped_steps)
    skipped_syncs = property(lambda self: self._impl.skipped_syncs)
    fragments = property(lambda self: self._impl.fragments)
    bytes_per_sync = property(lambda self: self._impl.bytes_per_sync,
                              doc="bytes this worker sends per sync of every fragment")
    fingerprint = property(lambda self: self._impl.fingerprint)

    @property
    def bytes_sent(self):
        """Bytes this worker has sent through its communicator (all handles on it)."""
        return self.comm.bytes_sent

    def global_params(self):
        """The global parameters after the last sync, flat, as a float32 tensor (a copy)."""
        return torch.tensor(self._impl.global_params(), dtype=torch.float32)

    def compressor_state(self):
        """The error-feedback residual (MuLoCo), flat, as a float32 tensor (a copy)."""
        return torch.tensor(self._impl.compressor_state(), dtype=torch.float32)


class Optimizer(_Handle):
    """A bare loco inner optimizer (AdamW or SGD) over torch parameters, without any sync."""

    def __init__(self, named_params, policy):
        kinds = {AdamW: _loco.Optimizer_adamw, SGD: _loco.Optimizer_sgd}
        if type(policy) not in kinds:
            raise InvalidArgument("loco: Optimizer takes loco.AdamW(...) or loco.SGD(...)")
        items, self._tensors = _items(named_params, None)
        self._impl = kinds[type(policy)](items, asdict(policy))

    def step(self):
        self._check_grads()
        return self._impl.step()

    steps = property(lambda self: self._impl.steps)


def two_bit_round_trip(x, out, rows=0, per_row=False, range=6.0):
    """MuLoCo's 2-bit statistical quantizer (loco::compress::statistical<2>) on one float32 CPU
    tensor: writes decode(encode(x)) into `out` and returns the payload's size in bytes. per_row
    quantizes each of `rows` rows with its own statistics (algorithms.md section 4.3)."""
    for name, t in (("x", x), ("out", out)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise InvalidArgument(f"loco: two_bit_round_trip needs contiguous float32 CPU tensors, "
                                  f"and {name} is {t.dtype} on {t.device}")
    return _loco.two_bit_round_trip(torch.utils.dlpack.to_dlpack(x.detach()),
                                    torch.utils.dlpack.to_dlpack(out.detach()), rows, per_row,
                                    range)


# ---- torch.distributed ----------------------------------------------------------------------------

class _TorchCollectives:
    """What the C++ communicator calls: torch.distributed on tensors that wrap loco's buffers
    (DLPack capsules, zero copy). The blocking collectives of the default (or given) group."""

    def __init__(self, group):
        self.group = group

    @staticmethod
    def _wrap(capsule):
        return torch.utils.dlpack.from_dlpack(capsule)

    def all_reduce(self, capsule, mean):
        t = self._wrap(capsule)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        if mean:
            t.div_(dist.get_world_size(self.group))

    def all_gather(self, send, recv):
        s, r = self._wrap(send), self._wrap(recv)
        dist.all_gather(list(r.chunk(dist.get_world_size(self.group))), s.clone(),
                        group=self.group)

    def all_to_all(self, send, recv):
        s, r = self._wrap(send), self._wrap(recv)
        dist.all_to_all_single(r, s, group=self.group)

    def broadcast(self, capsule, root):
        dist.broadcast(self._wrap(capsule), src=dist.get_global_rank(self.group, root)
                       if self.group is not None else root, group=self.group)

    def barrier(self):
        dist.barrier(group=self.group)


def TorchDistributed(group=None):
    """A loco communicator over torch.distributed (initialise the process group first, gloo for
    CPU tensors). Counts the bytes it sends as the other loco communicators do."""
    if not dist.is_available() or not dist.is_initialized():
        raise CommError("loco: torch.distributed is not initialised; call "
                        "torch.distributed.init_process_group('gloo', ...) first")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    return _loco.PythonCommunicator(_TorchCollectives(group), rank, size, "torch_distributed")
