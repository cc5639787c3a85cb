"""Seeded stand-in weights laid out as a public checkpoint, for tests and reference fixtures.

The public Mask2Former / MinVIS checkpoints are not shipped; their key lists (name -> shape, in
state-dict order) are (``tests/data/*_keys.json``). ``seeded_state_dict`` fills such a list with
values from one seeded generator, key by key in list order, so the same seed gives the same
weights in the tests and in ``tools/make_golden.py``, which runs the reference implementations
on them. The values are scaled so that activations stay O(1) through the whole network (fan-in
scaled weights, near-1 norm scales, positive running variances); they are not trained weights.
"""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

KEY_LISTS = Path(__file__).resolve().parents[2] / "tests" / "data"
COCO_PKL_KEYS = "mask2former_r50_coco_instance.pkl_keys.json"  # model_final_3c8ec9.pkl, 80 classes
MINVIS_PTH_KEYS = "minvis_ytvis19_r50.pth_keys.json"  # MinVIS YTVIS19 R50, 40 classes


EMBEDDINGS = ("query_feat.weight", "static_query.weight", "query_embed.weight", "level_embed.weight",
              "level_embed")


def key_list(name: str, folder: str | Path = KEY_LISTS) -> dict[str, list[int]]:
    """name -> shape of a reference checkpoint (``COCO_PKL_KEYS`` / ``MINVIS_PTH_KEYS``), in order."""
    return json.loads((Path(folder) / name).read_text())


def seeded_state_dict(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """float32 arrays with the names and shapes of ``shapes``, drawn in order from ``seed``."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    # one draw for everything, then a transform per key in place: fast for 44M values
    z = np.random.default_rng(seed).standard_normal(sum(sizes), dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    start = 0
    for (name, shape), n in zip(shapes.items(), sizes):
        v = z[start:start + n].reshape(shape)
        start += n
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            np.abs(v, out=v)
            v *= 0.5
            v += 0.5
        elif leaf == "running_mean" or (leaf == "bias" and len(shape) == 1):
            v *= 0.1
        elif leaf == "empty_weight":  # the criterion's buffer
            v[...] = 1.0
        elif len(shape) == 1:  # norm scales
            v *= 0.1
            v += 1.0
        elif name.endswith(EMBEDDINGS):  # learned queries and level embeddings: N(0, 1)
            pass
        else:  # conv / linear weights: fan-in scaled
            v *= np.float32(1.0 / np.sqrt(np.prod(shape[1:])))
        out[name] = v
    return out


# A state dict saved by torch / detectron2 carries per-module versions (``_metadata``), and the
# reference loaders act on them: Mask2Former's head prefixes ``pixel_decoder.`` again to keys of a
# version < 2 ``sem_seg_head``, and its decoder renames ``static_query`` to ``query_feat`` when the
# predictor is version < 2. For the published files to load as they do, the COCO .pkl (spelled
# static_query) must say head 2 / predictor 1, and the MinVIS .pth (query_feat) head 2 / predictor 2.
COCO_PKL_VERSIONS = {"sem_seg_head": {"version": 2}, "sem_seg_head.predictor": {"version": 1}}
MINVIS_PTH_VERSIONS = {"sem_seg_head": {"version": 2}, "sem_seg_head.predictor": {"version": 2}}


def _with_versions(state: dict, versions: dict) -> OrderedDict:
    out = OrderedDict(state)
    out._metadata = {k: dict(v) for k, v in versions.items()}  # as nn.Module.state_dict() sets it
    return out


def write_detectron2_pkl(path: str | Path, state: dict[str, np.ndarray]) -> Path:
    """``state`` as a detectron2 model-zoo ``.pkl`` (``{"model": ..., "__author__": ...}``)."""
    with open(path, "wb") as f:
        pickle.dump({"model": _with_versions(state, COCO_PKL_VERSIONS), "__author__": "MaskFormer Model Zoo"},
                    f, protocol=2)
    return Path(path)


def write_minvis_pth(path: str | Path, state: dict[str, np.ndarray]) -> Path:
    """``state`` as a MinVIS / detectron2 training checkpoint ``.pth`` (``{"model": tensors, "iteration"}``)."""
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({"model": _with_versions(tensors, MINVIS_PTH_VERSIONS), "iteration": 5999}, path)
    return Path(path)
