"""Checkpoints: the project's own format, and pretrained weights from torchvision / detectron2.

Nothing here executes code from a file: ``.pth`` files go through ``torch.load(weights_only=True)``,
and detectron2 ``.pkl`` files through an unpickler that only admits numpy arrays and containers.

Own format (``save_checkpoint``): ``{"format", "config": dict, "class_names", "extra", "model": state_dict}``.

detectron2 Mask2Former / MinVIS names -> ours (``map_detectron2_key``):

    ============================================  ====================================================
    detectron2                                    svis-ray
    ============================================  ====================================================
    backbone.stem.conv1.weight                    backbone.conv1.weight
    backbone.stem.conv1.norm.{w,b,mean,var}       backbone.bn1.{...}
    backbone.res{N}.{i}.conv{k}.weight            backbone.layer{N-1}.{i}.conv{k}.weight
    backbone.res{N}.{i}.conv{k}.norm.{...}        backbone.layer{N-1}.{i}.bn{k}.{...}
    backbone.res{N}.0.shortcut.weight             backbone.layer{N-1}.0.downsample.0.weight
    backbone.res{N}.0.shortcut.norm.{...}         backbone.layer{N-1}.0.downsample.1.{...}
    sem_seg_head.predictor.static_query.weight    sem_seg_head.predictor.query_feat.weight (COCO name)
    sem_seg_head.* (everything else)              unchanged
    criterion.* (loss state, e.g. empty_weight)   ignored: rebuilt by the loss from the class count
    ============================================  ====================================================
"""
from __future__ import annotations

import codecs
import io
import collections
import logging
import os
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from svis_ray.errors import SvisError
from svis_ray import io as svis_io
from svis_ray.io import is_uri
from svis_ray.model.minvis import MinVIS, ModelConfig

FORMAT = "svis-ray/minvis/1"
log = logging.getLogger("svis_ray")

_RES_BLOCK = re.compile(r"backbone\.res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)$")


def map_detectron2_key(name: str) -> str | None:
    """Translate one detectron2 Mask2Former/MinVIS key (see the module table); None = not model state."""
    if name.startswith("criterion."):
        return None
    if name.startswith("backbone.stem.conv1."):
        return "backbone.bn1." + name.rsplit(".", 1)[1] if ".norm." in name else "backbone.conv1.weight"
    m = _RES_BLOCK.match(name)
    if m:
        stage, block, conv, norm, attr = m.groups()
        prefix = f"backbone.layer{int(stage) - 1}.{block}"
        if conv == "shortcut":
            return f"{prefix}.downsample.{1 if norm else 0}.{attr}"
        return f"{prefix}.{conv.replace('conv', 'bn') if norm else conv}.{attr}"
    return name.replace("sem_seg_head.predictor.static_query.", "sem_seg_head.predictor.query_feat.")


def _map_torchvision_key(name: str) -> str | None:
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):  # classifier; BN bookkeeping
        return None
    return "backbone." + name


# ---------------------------------------------------------------------------- reading files

class _Refused(pickle.UnpicklingError):
    pass


def _numpy_globals() -> dict[tuple[str, str], object]:
    """What numpy pickles arrays with, taken from numpy's own reductions (no deprecated import)."""
    arr = np.zeros(1, np.float32)
    reconstruct, scalar, frombuffer = arr.__reduce__()[0], arr[0].__reduce__()[0], arr.__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer  # protocol-5 arrays
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Reads detectron2 ``.pkl`` files; any other global (e.g. ``os.system``) is refused."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise _Refused(f"refused to unpickle '{module}.{name}' (only numpy arrays and plain containers are allowed)")


def _location(path: str | os.PathLike) -> Path | str:
    """A local path as a ``Path``; a URI as given (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    return str(path) if is_uri(path) else Path(path)


def _read(path: str | os.PathLike) -> dict:
    """Load a checkpoint file as a dict without executing code; every failure is an SvisError."""
    p = _location(path)
    if is_uri(p):  # object storage: read once into memory (checkpoints fit in it anyway)
        if not svis_io.is_file(p):
            raise SvisError(f"{p}: checkpoint not found" if not svis_io.exists(p) else f"{p}: expected a checkpoint file")
        src = io.BytesIO(svis_io.read_bytes(p, "checkpoint"))
    else:
        if not p.is_file():
            raise SvisError(f"{p}: checkpoint not found" if not p.exists() else f"{p}: expected a checkpoint file")
        src = p
    try:
        if str(p).endswith(".pkl"):
            with (open(src, "rb") if isinstance(src, Path) else src) as f:
                obj = _NumpyUnpickler(f, encoding="latin1").load()
        else:
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except _Refused as e:
        raise SvisError(f"{p}: {e}") from None
    except Exception as e:  # truncated zip, bad opcode, EOF, a global refused by torch ...: a bad file
        refused = re.search(r"GLOBAL (\S+)", str(e))  # how torch's weights-only unpickler names it
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise SvisError(f"{p}: refused to unpickle '{refused.group(1)}' (only tensors and plain "
                            "containers are allowed)") from None
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SvisError(f"{p}: unreadable or corrupt checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(obj, dict):
        raise SvisError(f"{p}: not a checkpoint (expected a dict, found {type(obj).__name__})")
    return obj


def _tensors(path: Path, state: object) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise SvisError(f"{path}: not a checkpoint (the weights are a {type(state).__name__}, expected a dict)")
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise SvisError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k] = v
    return out


def _match(path: Path, model: nn.Module, state: dict[str, torch.Tensor], mapper: Callable[[str], str | None],
           required: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map ``state`` onto ``model``: (tensors to load, {skipped name: "file shape -> model shape"}, keys ignored).

    Raises unless every ``required`` model key is provided and every mapped key exists in the model.
    """
    own = model.state_dict()
    load, skipped, ignored, unexpected = {}, {}, [], []
    for key, value in state.items():
        name = mapper(key)
        if name is None:
            ignored.append(key)
        elif name not in own:
            unexpected.append(key)
        elif value.shape != own[name].shape:
            skipped[name] = f"{list(value.shape)} -> {list(own[name].shape)}"
        else:
            load[name] = value
    missing = [k for k in own if required(k) and k not in load and k not in skipped]
    if missing or unexpected:
        raise SvisError(f"{path}: weights do not fit the model: {len(missing)} missing "
                        f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                        f"(e.g. {', '.join(unexpected[:3]) or '-'})")
    return load, skipped, ignored


def load_pretrained(model: MinVIS, path: str | os.PathLike) -> dict:
    """Load pretrained weights into ``model`` in place.

    Accepts a torchvision ResNet ImageNet state dict (into the backbone; ``fc.*`` dropped), a
    detectron2 Mask2Former/MinVIS checkpoint (``.pkl`` or ``.pth``, mapped by
    ``map_detectron2_key``) or an svis-ray checkpoint. Tensors whose shape differs from the model
    (a class head for another class count) keep their fresh initialisation and are logged in one line.

    Returns ``{"format", "loaded": int, "skipped": [model keys], "ignored": [file keys]}``.
    """
    p = _location(path)
    ckpt = _read(p)
    if ckpt.get("format") == FORMAT:
        fmt, state, mapper = "svis-ray", ckpt.get("model"), lambda k: k
    else:
        state = ckpt.get("model", ckpt)  # detectron2 wraps the weights under "model"
        torchvision_resnet = isinstance(state, dict) and "layer1.0.conv1.weight" in state
        fmt = "torchvision" if torchvision_resnet else "detectron2"
        mapper = _map_torchvision_key if torchvision_resnet else map_detectron2_key
    required = (lambda k: k.startswith("backbone.")) if fmt == "torchvision" else (lambda k: True)
    load, skipped, ignored = _match(p, model, _tensors(p, state), mapper, required)
    model.load_state_dict(load, strict=False)
    if skipped:
        log.warning("%s: %d tensors differ in shape from the model and keep their initialisation: %s", p,
                    len(skipped), ", ".join(f"{k} {shapes}" for k, shapes in skipped.items()))
    log.info("%s: loaded %d tensors (%s)", p, len(load), fmt)
    return {"format": fmt, "loaded": len(load), "skipped": list(skipped), "ignored": ignored}


def save_checkpoint(path: str | os.PathLike, model: MinVIS, class_names: list[str], extra: dict | None = None) -> Path:
    """Write model weights + config + class names atomically.

    ``extra`` (e.g. step, metrics) must hold only plain types and tensors, so it loads with weights_only.
    """
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.config.num_classes}-class model")
    payload = {
        "format": FORMAT,
        "config": asdict(model.config),
        "class_names": list(class_names),
        "extra": extra or {},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with svis_io.output_file(path) as tmp:
        torch.save(payload, tmp)
    return _location(path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MinVIS, dict]:
    """Rebuild a model saved by ``save_checkpoint`` -> (model on ``device``, info).

    info: ``config`` (ModelConfig), ``class_names`` (list[str]), ``extra`` (dict).
    """
    p = _location(path)
    ckpt = _read(p)
    if ckpt.get("format") != FORMAT:
        raise SvisError(f"{p}: not an svis-ray checkpoint (use it as pretrained weights instead)")
    try:
        config = ModelConfig(**ckpt.get("config", {}))
    except (TypeError, SvisError) as e:  # unknown field, not a dict, invalid value
        raise SvisError(f"{p}: bad model config in checkpoint: {e}") from None
    model = MinVIS(config)
    load, skipped, _ = _match(p, model, _tensors(p, ckpt.get("model")), lambda k: k, lambda k: True)
    if skipped:
        raise SvisError(f"{p}: tensor shapes differ from the stored config (e.g. {', '.join(list(skipped)[:3])})")
    model.load_state_dict(load)
    return model.to(device), {"config": config, "class_names": list(ckpt.get("class_names", [])),
                              "extra": ckpt.get("extra", {})}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               class_names: list[str] | None = None, source: str = "the dataset") -> tuple[MinVIS, dict]:
    """A model ready for inference from an svis-ray checkpoint or an official detectron2 one.

    svis-ray checkpoints go through ``load_checkpoint``. A MinVIS / Mask2Former-VIS ``.pth`` (or
    ``.pkl``) with the R50 layout becomes a ``minvis_r50`` model whose class and query counts are
    read off its tensors; it names no classes, so ``class_names`` (the categories of ``source``,
    e.g. valid.json) must be given and must match its class head, and every tensor must fit
    (nothing is left at its initialisation). Returns (model on ``device``, info) as
    ``load_checkpoint``; for an official checkpoint ``info["extra"]`` holds ``format`` and
    MinVIS's own test settings (``tracker`` minvis, short side 360, long side at most 1333).
    """
    p = _location(path)
    ckpt = _read(p)
    if ckpt.get("format") == FORMAT:
        return load_checkpoint(p, device)
    state = _tensors(p, ckpt.get("model", ckpt))
    head = state.get("sem_seg_head.predictor.class_embed.weight")
    query = state.get("sem_seg_head.predictor.query_feat.weight", state.get("sem_seg_head.predictor.static_query.weight"))
    if head is None or query is None:
        raise SvisError(f"{p}: neither an svis-ray checkpoint nor a MinVIS/Mask2Former one "
                        f"(no sem_seg_head.predictor.class_embed / query_feat weights)")
    num_classes = head.shape[0] - 1
    if class_names is None:
        raise SvisError(f"{p}: a MinVIS/Mask2Former checkpoint names no classes: predict a YTVIS JSON "
                        f"(its categories name the {num_classes} classes)")
    if len(class_names) != num_classes:
        raise SvisError(f"{p}: the checkpoint's class head has {num_classes} classes but {source} lists "
                        f"{len(class_names)} categories")
    model = MinVIS(ModelConfig(num_classes=num_classes, num_queries=query.shape[0]))
    load, skipped, _ = _match(p, model, state, map_detectron2_key, lambda k: True)
    if skipped:
        raise SvisError(f"{p}: tensor shapes differ from MinVIS R50 (e.g. "
                        f"{', '.join(f'{k} {v}' for k, v in list(skipped.items())[:3])})")
    model.load_state_dict(load)
    extra = {"format": "detectron2", "tracker": "minvis", "min_size_test": 360, "max_size_test": 1333}
    return model.to(device), {"config": model.config, "class_names": list(class_names), "extra": extra}
