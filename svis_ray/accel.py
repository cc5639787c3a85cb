"""Speed: numeric precision, ``torch.compile`` with input-size buckets, channels_last, and an
account of host synchronisations.

Precision (``train.precision``, ``teacher.precision``, ``predict --precision``):

- ``fp32``: full fp32, TF32 off;
- ``tf32``: fp32 tensors, TF32 tensor-core matmuls/convolutions (Ampere+);
- ``bf16``: autocast bf16 (no loss scaling: bf16 has fp32's range) over TF32; the deformable
  attention's sampling offsets and bilinear sampling, the losses and the matching costs stay fp32;
- ``fp16``: MinVIS's AMP (autocast fp16 + GradScaler).

Configs choose for the GPU: on a CPU every precision runs as fp32 (``effective_precision``):
bf16 autocast is only fast on CPUs with AMX, and the demo's CPU numbers stay comparable.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def effective_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` on a CUDA device, ``fp32`` elsewhere (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision if torch.device(device).type == "cuda" else "fp32"


def set_matmul_precision(precision: str) -> None:
    """TF32 for every precision but ``fp32`` (process-wide switches)."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast region of a forward pass at ``precision`` (a no-op for fp32/tf32, and for fp16
    off CUDA: CPU fp16 autocast is neither fast nor what MinVIS's AMP means)."""
    dev = torch.device(device).type
    dtype = _AUTOCAST.get(precision)
    enabled = dtype is not None and (dev == "cuda" or dtype is torch.bfloat16)
    return torch.autocast(dev, dtype=dtype or torch.bfloat16, enabled=enabled)


def channels_last(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The backbone's convolutions in channels_last on CUDA (tensor cores read NHWC without a
    transpose; cuDNN picks NHWC output when the weight is NHWC). The rest of the model reshapes
    maps into token sequences, where the layout does not matter."""
    if torch.device(device).type == "cuda" and hasattr(model, "backbone"):
        model.backbone.to(memory_format=torch.channels_last)
    return model


class CompiledModel(nn.Module):
    """``torch.compile`` of a per-frame model with static shapes, recording the distinct input
    shapes it has been called with (each one a compilation). Inputs should come padded to a few
    size buckets (``ClipCollate(size_multiple=...)``) so that the set stays small.

    Parameters are the wrapped model's (``module``): save and load that, not this wrapper.
    """

    def __init__(self, module: nn.Module, max_shapes: int = 32):
        super().__init__()
        import torch._dynamo

        # Each bucket shape is one cache entry; Dynamo's default limit (8) would fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_shapes)
        self.module = module
        self.compiled = torch.compile(module, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> dict:
        self.shapes.add(tuple(x.shape))
        return self.compiled(x)


def maybe_compile(model: nn.Module, compile: bool) -> nn.Module:
    return CompiledModel(model) if compile else model


def compiled_shapes(model: nn.Module) -> int:
    """Distinct input shapes a ``CompiledModel`` has compiled for; 0 for an eager model."""
    return len(model.shapes) if isinstance(model, CompiledModel) else 0


# ----------------------------------------------------------------------------- host syncs
_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
                 "__array__", "to")


class HostSyncs:
    """Counts Python-level device->host synchronisations: ``Tensor.item/tolist/numpy/cpu``,
    ``bool/float/int(tensor)``, ``np.asarray(tensor)`` and ``tensor.to("cpu")`` from another
    device, each at its outermost call (``np.asarray`` calling ``.numpy()`` counts once).

    ``sites`` maps "file:line" to counts. Ignored: calls on a tensor that an earlier counted
    ``.cpu()`` returned (already on the host), calls from ``torch/optim`` (optimizers read their
    step counters, which live on the CPU unless the optimizer is fused or capturable).
    On CUDA, ``cuda`` additionally counts the synchronisations the CUDA sync debug mode reports
    (also those inside C++ ops such as boolean indexing, which this instrumentation cannot see).
    """

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()
        self.cuda = 0
        self._host: dict[int, weakref.ref] = {}  # by id: tensors compare elementwise
        self._local = threading.local()
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def _wrap(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if getattr(counter._local, "depth", 0):
                return original(tensor, *args, **kwargs)
            counter._local.depth = 1
            try:
                out = original(tensor, *args, **kwargs)
            finally:
                counter._local.depth = 0
            seen = counter._host.get(id(tensor))
            if seen is not None and seen() is tensor:
                return out
            if name == "to" and not (isinstance(out, torch.Tensor) and out.device.type == "cpu"
                                     and tensor.device.type != "cpu"):
                return out
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if "/torch/optim/" in where.replace("\\", "/"):
                return out
            if name == "cpu" and isinstance(out, torch.Tensor):
                counter._host[id(out)] = weakref.ref(out)
            counter.sites[f"{where}:{caller.f_lineno} {name}"] += 1
            return out

        return wrapper

    def __enter__(self) -> "HostSyncs":
        for name in _SYNC_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._cuda_ctx = None
        if torch.cuda.is_available():
            import warnings

            self._cuda_ctx = warnings.catch_warnings(record=True)
            self._warnings = self._cuda_ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        if self._cuda_ctx is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda = sum("synchroniz" in str(w.message) for w in self._warnings)
            self._cuda_ctx.__exit__(*exc)

    def report(self) -> Iterator[str]:
        for site, n in self.sites.most_common():
            yield f"{n:4d}  {site}"


class FrameModel(nn.Module):
    """A per-frame model for inference at ``precision`` (autocast on its device), optionally
    compiled; outputs come back fp32, so tracking and thresholds see the usual numbers. Keeps the
    wrapped model's contract (``track_video`` runs it like the model itself)."""

    def __init__(self, model: nn.Module, precision: str = "fp32", compile: bool = False):
        super().__init__()
        device = next(model.parameters()).device
        self.precision = effective_precision(precision, device)
        set_matmul_precision(self.precision)
        self.model = channels_last(model, device)
        self.run = maybe_compile(model, compile)

    def forward(self, x: torch.Tensor) -> dict:
        with autocast(self.precision, x.device):
            out = self.run(x)
        return {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
