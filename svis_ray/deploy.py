"""Deployment: the per-frame MinVIS model as ONNX (``svis-ray export``), run by onnxruntime.

``export_onnx`` writes the final-layer outputs of ``MinVIS.forward`` (``pred_logits``,
``pred_masks``, ``pred_embds``; the auxiliary per-layer predictions only matter to training) for
the preprocessed input (``model.preprocess``: normalised, zero-padded to /32), traced by the
TorchScript exporter of ``torch.onnx.export``. Everything ``predict`` reads from a checkpoint
travels in the ONNX model's metadata (``metadata_props``, JSON values): the class names, the
training run's test sizes and tracker (``extra``), the normalisation constants and the model
config. ``OnnxModel`` is the onnxruntime side: a callable with ``MinVIS.forward``'s contract for
those three outputs, so ``tracking.track_video`` runs it unchanged.

Exporter choice (torch 2.14, measured on the tiny preset, docs/design.md): the TorchScript
exporter (``dynamo=False``) takes seconds and keeps batch and spatial axes dynamic; the
``torch.export`` one (``dynamo=True``) took minutes and specialised the batch axis of the example.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from svis_ray.data.transforms import pad_to_multiple
from svis_ray.errors import SvisError
from svis_ray.io import atomic_path
from svis_ray.model import load_model
from svis_ray.model.minvis import PIXEL_MEAN, PIXEL_STD, MinVIS, ModelConfig

ONNX_FORMAT = "svis-ray/minvis-onnx/1"
INPUT = "images"
OUTPUTS = ("pred_logits", "pred_masks", "pred_embds")
OPSET = 17  # LayerNormalization is an ONNX op from 17 on; onnxruntime >= 1.14 runs it


class FinalOutputs(nn.Module):
    """``MinVIS`` with a tuple of the final-layer outputs, what ``torch.onnx.export`` traces."""

    def __init__(self, model: MinVIS):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] preprocessed -> (pred_logits [B,Q,K+1], pred_masks [B,Q,H/4,W/4], pred_embds [B,Q,C])."""
        out = self.model(x)
        return tuple(out[k] for k in OUTPUTS)


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``extra`` without what JSON cannot hold (tensors)."""
    out = {}
    for k, v in extra.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, height: int | None = None,
                width: int | None = None, dynamic: bool = False, class_names: list[str] | None = None,
                source: str = "the dataset") -> dict[str, Any]:
    """Export a checkpoint (``model.load_model``: svis-ray, or an official one with ``class_names``) to ONNX.

    The example input is ``height x width`` (rounded up to /32; default: the checkpoint's short test
    side by its long-side cap, a landscape frame at the test sizes). The batch axis is always
    dynamic; with ``dynamic`` the spatial axes are too, else the model takes that size only
    (``OnnxModel`` zero-pads smaller frames up to it). Written atomically and checked with
    ``onnx.checker``. Returns ``{"out", "height", "width", "dynamic", "opset", "bytes"}``.
    """
    import onnx

    for name, v in (("height", height), ("width", width)):
        if v is not None and v < 32:
            raise SvisError(f"export: {name} must be at least 32 pixels, got {v}")
    model, info = load_model(checkpoint, "cpu", class_names, source)
    model.eval()
    extra = _jsonable(info["extra"])
    h, w = pad_to_multiple(height or int(extra.get("min_size_test", 360)), width or int(extra.get("max_size_test", 1333)))
    # batch 2, not 1: the tracer must not see a size-1 axis it could broadcast or squeeze away
    x = torch.zeros(2, 3, h, w)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    mask_axes = {0: "batch", 2: "height_4", 3: "width_4"} if dynamic else {0: "batch"}
    dynamic_axes = {INPUT: axes, "pred_logits": {0: "batch"}, "pred_masks": mask_axes, "pred_embds": {0: "batch"}}
    metadata = {
        "format": ONNX_FORMAT,
        "class_names": info["class_names"],
        "extra": extra,  # min_size_test, max_size_test, tracker, topk ... of the training run
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "config": asdict(info["config"]),
        "input": f"{INPUT}: float32 [B,3,H,W], (RGB 0..255 - pixel_mean) / pixel_std inside each frame, 0 in the "
                 "bottom/right padding, H and W multiples of 32",
        "input_size": None if dynamic else [h, w],
        "checkpoint": Path(checkpoint).name,
    }
    with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation notice and tracer warnings about Python ints are
        # expected: the sizes it warns about are dynamic in the graph (tests/test_export.py checks)
        warnings.simplefilter("ignore")
        torch.onnx.export(FinalOutputs(model), (x,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=dynamic_axes)
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            proto.metadata_props.add(key=f"svis_ray.{key}", value=json.dumps(value))
        proto.doc_string = "svis-ray MinVIS per-frame model (svis-ray predict --onnx)"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return {"out": str(out), "height": h, "width": w, "dynamic": dynamic, "opset": OPSET,
            "bytes": Path(out).stat().st_size}


def providers() -> list[str]:
    """onnxruntime execution providers: CUDA first when this onnxruntime build and machine have it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxModel:
    """An exported model run by onnxruntime, called like ``MinVIS`` on the preprocessed input.

    ``__call__(x [B,3,h,w] float32, h and w multiples of 32)`` returns torch CPU tensors
    ``pred_logits`` [B,Q,K+1], ``pred_masks`` [B,Q,h/4,w/4], ``pred_embds`` [B,Q,C]. A
    fixed-size model zero-pads the input up to its size (the same zeros ``preprocess`` pads
    with) and crops the masks back. ``info``: ``config``, ``class_names``, ``extra`` as
    ``model.load_model`` returns them. Intra-op threads follow torch's (Ray actors run one).
    """

    def __init__(self, path: str | os.PathLike, provider_names: list[str] | None = None):
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise SvisError(f"{p}: ONNX model not found" if not p.exists() else f"{p}: expected an ONNX model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: a bad file becomes one SvisError line
        try:
            self.session = ort.InferenceSession(str(p), options, providers=provider_names or providers())
        except Exception as e:  # protobuf parse failure, truncated file, unknown op ...
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise SvisError(f"{p}: unreadable or corrupt ONNX model ({type(e).__name__}: {first_line[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = self._read_metadata(p, meta)
        names = [o.name for o in self.session.get_outputs()]
        if [i.name for i in self.session.get_inputs()] != [INPUT] or names[:3] != list(OUTPUTS):
            raise SvisError(f"{p}: not an svis-ray export (inputs/outputs {names}, expected {INPUT} -> {', '.join(OUTPUTS)})")
        size = self.metadata.get("input_size")
        self.input_size = tuple(size) if size else None
        self.info = {"config": ModelConfig(**self.metadata["config"]), "class_names": self.metadata["class_names"],
                     "extra": dict(self.metadata.get("extra", {}), format="onnx")}
        self.providers = self.session.get_providers()

    @staticmethod
    def _read_metadata(path: Path, meta: dict[str, str]) -> dict[str, Any]:
        if meta.get("svis_ray.format") is None:
            raise SvisError(f"{path}: not an svis-ray ONNX model (no svis_ray.format metadata; "
                            f"make one with svis-ray export)")
        try:
            out = {k.removeprefix("svis_ray."): json.loads(v) for k, v in meta.items() if k.startswith("svis_ray.")}
            if out["format"] != ONNX_FORMAT:
                raise SvisError(f"{path}: ONNX model format {out['format']!r}, this svis-ray reads {ONNX_FORMAT!r}")
            if not isinstance(out["class_names"], list) or not isinstance(out["config"], dict):
                raise ValueError("class_names or config")
            ModelConfig(**out["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise SvisError(f"{path}: bad svis-ray metadata in the ONNX model ({type(e).__name__}: {e})") from None
        return out

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        if self.input_size is not None:
            fh, fw = self.input_size
            if h > fh or w > fw:
                raise SvisError(f"frames padded to {h}x{w} do not fit this fixed-size ONNX model ({fh}x{fw}): "
                                f"export with --dynamic, or with --height/--width at least the frame size")
            x = torch.nn.functional.pad(x, (0, fw - w, 0, fh - h))
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        logits, masks, embds = self.session.run(list(OUTPUTS), {INPUT: feed})[:3]
        out = {"pred_logits": torch.from_numpy(logits), "pred_masks": torch.from_numpy(masks),
               "pred_embds": torch.from_numpy(embds)}
        if self.input_size is not None:  # the masks of the frame area (stride 4; padding is bottom/right)
            out["pred_masks"] = out["pred_masks"][..., : h // 4, : w // 4]
        return out
