"""Write tests/data/golden_minvis.npz: what the reference implementations compute on seeded weights.

NOT run by CI: it needs the reference checkouts, which the project neither ships nor imports.
The fixture it writes is what ``tests/test_golden.py`` compares svis-ray's model, preprocessing
and MinVIS inference against.

Reference code, pinned (commit hashes are stored in the .npz as well):
    facebookresearch/detectron2   02b5c4e295e990042a714712c21dc79b731e8833
    facebookresearch/Mask2Former  9b0651c6c1d5b3af2e6da0589b719c514ec0d69a
    NVlabs/MinVIS                 d039c54b9831b623e27f2edb1d28b8e84d694cda
(MinVIS's copies of ``mask2former/`` and ``mask2former_video/`` are blob-identical to
Mask2Former's at these commits.)

How to run (CPU, fp32, a few minutes):
    git clone https://github.com/facebookresearch/detectron2 && git -C detectron2 checkout 02b5c4e
    git clone https://github.com/facebookresearch/Mask2Former && git -C Mask2Former checkout 9b0651c
    git clone https://github.com/NVlabs/MinVIS && git -C MinVIS checkout d039c54
    pip install --target refpkgs --no-deps fvcore iopath omegaconf antlr4-python3-runtime==4.9.3 \\
        yacs termcolor tabulate einops portalocker tqdm cloudpickle timm matplotlib contourpy \\
        cycler fonttools kiwisolver pyparsing python-dateutil six
    PYTHONPATH=$PWD:refpkgs python tools/make_golden.py --detectron2 detectron2 \\
        --mask2former Mask2Former --minvis MinVIS [--out tests/data/golden_minvis.npz]

detectron2 is imported from its source tree without building it: the model code is pure Python,
and two compiled modules get empty stand-ins that the computation never reaches:
``detectron2._C`` (imported by COCO evaluation code at package import) and
``MultiScaleDeformableAttention`` (Mask2Former's CUDA op; without its functions
``MSDeformAttn.forward`` takes its own CPU path, ``ms_deform_attn_core_pytorch``).

What it records (weights from ``svis_ray.model.seeded``, inputs drawn here and stored):
- ``coco_*``: Mask2Former's COCO instance R50 (``MaskFormer`` meta-architecture, its config
  ``configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml``) with seeded weights laid
  out as ``model_final_3c8ec9.pkl`` (seed 0), loaded by detectron2's ``DetectionCheckpointer``, on
  one uint8 image of 52x60: the backbone's input (the reference preprocessing: normalise, then
  pad to 64x64 with 0), the pixel decoder's mask features and three multi-scale maps, and
  ``pred_logits`` / ``pred_masks`` after the learnable queries and after each of the 9 layers.
- ``minvis_*``: MinVIS's ``VideoMaskFormer_frame`` (its YTVIS19 R50 config) with seeded weights
  laid out as the MinVIS YTVIS19 R50 ``.pth`` (seed 1), run by MinVIS's own ``forward`` on a
  3-frame 52x60 clip: the per-frame outputs, the permutations ``match_from_embds`` returns, the
  matched average logits, and the video result (top-10 scores, labels, the queries they come
  from, and the masks at the clip's size).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svis_ray.model.seeded import (COCO_PKL_KEYS, MINVIS_PTH_KEYS, key_list, seeded_state_dict,  # noqa: E402
                                   write_detectron2_pkl, write_minvis_pth)

COCO_SEED, MINVIS_SEED = 0, 1
H, W = 52, 60  # padded to 64 x 64: the padding path is exercised
FRAMES = 3


def test_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], clip uint8 [FRAMES,H,W,3]): smooth backgrounds with a few coloured
    rectangles that move a little from frame to frame (matching has something to follow)."""
    rng = np.random.default_rng(seed)

    def scene(t: int) -> np.ndarray:
        yy, xx = np.mgrid[0:H, 0:W]
        img = np.stack([60 + 2 * xx, 80 + 2 * yy, 120 + xx - yy], -1).astype(np.float64)
        for k, (y, x, c) in enumerate([(8, 6, (230, 40, 40)), (26, 30, (40, 200, 60)), (14, 40, (50, 60, 220))]):
            dy, dx = (t * (k + 1)) % 5, (2 * t) % 7
            img[y + dy:y + dy + 14, x + dx:x + dx + 12] = c
        img += rng.normal(0, 6, img.shape)
        return img.clip(0, 255).astype(np.uint8)

    return scene(7), np.stack([scene(t) for t in range(FRAMES)])


def git_head(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def import_references(detectron2: Path, mask2former: Path, minvis: Path) -> None:
    standins = Path(tempfile.mkdtemp())
    (standins / "MultiScaleDeformableAttention.py").write_text('"""Stand-in: no compiled op."""\n')
    # mask2former / mask2former_video from Mask2Former, minvis from MinVIS
    sys.path[:0] = [str(detectron2), str(standins), str(mask2former), str(minvis)]
    import detectron2 as d2

    sys.modules["detectron2._C"] = d2._C = types.ModuleType("detectron2._C")
    import mask2former  # noqa: F401  (registers the meta-architectures and heads)
    import mask2former_video  # noqa: F401
    import minvis  # noqa: F401


def reference_cfg(config_file: Path, adders: list, weights: Path):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    for add in adders:
        add(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()
    return cfg


def build_loaded(cfg, state: dict[str, np.ndarray]):
    """The reference model of ``cfg``, its weights read by detectron2's checkpointer from
    ``cfg.MODEL.WEIGHTS`` (which holds ``state``); every tensor of the model must be ``state``'s."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    own = model.state_dict()
    for name, value in state.items():
        name = name.replace("static_query", "query_feat")  # Mask2Former renames it on load
        assert name in own and np.array_equal(own[name].numpy(), value), f"{name} was not loaded"
    assert len(own) == len(state), f"{len(own)} model tensors, {len(state)} in the checkpoint"
    return model.eval()


def capture(module: torch.nn.Module, store: dict, key: str, inputs: bool = False) -> None:
    """Record a module's (first positional) input or its output on every call (a dict output is
    copied: MinVIS's post_processing rebinds its keys afterwards)."""
    def hook(mod, args, out):
        store.setdefault(key, []).append(args[0] if inputs else dict(out) if isinstance(out, dict) else out)
    module.register_forward_hook(hook)


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32)


@torch.no_grad()
def coco_reference(mask2former: Path, tmp: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    from mask2former import add_maskformer2_config

    state = seeded_state_dict(key_list(COCO_PKL_KEYS), COCO_SEED)
    weights = write_detectron2_pkl(tmp / "coco.pkl", state)
    cfg = reference_cfg(mask2former / "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
                        [add_maskformer2_config], weights)
    model = build_loaded(cfg, state)
    seen: dict[str, list] = {}
    capture(model.backbone, seen, "input", inputs=True)
    capture(model.sem_seg_head, seen, "head")
    pixel_decoder = model.sem_seg_head.pixel_decoder
    forward_features = pixel_decoder.forward_features

    def recorded(features):
        out = forward_features(features)
        seen["pixel"] = out
        return out

    pixel_decoder.forward_features = recorded
    model([{"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "height": H, "width": W}])
    head = seen["head"][0]
    mask_features, _, multi_scale = seen["pixel"]
    layers = head["aux_outputs"] + [{"pred_logits": head["pred_logits"], "pred_masks": head["pred_masks"]}]
    return {
        "coco_image": image,
        "coco_input": np32(seen["input"][0]),
        "coco_mask_features": np32(mask_features),
        **{f"coco_multi_scale_{i}": np32(m) for i, m in enumerate(multi_scale)},
        "coco_pred_logits": np.stack([np32(x["pred_logits"]) for x in layers]),  # [10, 1, Q, 81]
        "coco_pred_masks": np.stack([np32(x["pred_masks"]) for x in layers]),  # [10, 1, Q, 16, 16]
    }


@torch.no_grad()
def minvis_reference(mask2former: Path, minvis: Path, tmp: Path, clip: np.ndarray) -> dict[str, np.ndarray]:
    from mask2former import add_maskformer2_config
    from mask2former_video import add_maskformer2_video_config
    from minvis import add_minvis_config

    state = seeded_state_dict(key_list(MINVIS_PTH_KEYS), MINVIS_SEED)
    weights = write_minvis_pth(tmp / "minvis.pth", state)
    cfg = reference_cfg(minvis / "configs/youtubevis_2019/video_maskformer2_R50_bs32_8ep_frame.yaml",
                        [add_maskformer2_config, add_maskformer2_video_config, add_minvis_config], weights)
    model = build_loaded(cfg, state)
    seen: dict[str, list] = {}
    capture(model.backbone, seen, "input", inputs=True)
    capture(model.sem_seg_head, seen, "head")
    match, post = model.match_from_embds, model.post_processing

    def recorded_match(tgt, cur):
        indices = match(tgt, cur)
        seen.setdefault("perms", []).append(np.asarray(indices, np.int64))
        return indices

    def recorded_post(outputs):
        out = post(outputs)
        seen["matched_logits"] = np32(out["pred_logits"][0])
        return out

    model.match_from_embds, model.post_processing = recorded_match, recorded_post
    frames = [torch.from_numpy(f.transpose(2, 0, 1).copy()) for f in clip]
    video = model([{"image": frames, "height": H, "width": W}])
    head = seen["head"][0]
    scores = torch.tensor(video["pred_scores"])
    labels = torch.tensor(video["pred_labels"])
    masks = torch.stack(video["pred_masks"]).numpy()  # [10, T, H, W] bool
    # which query each (score, label) came from: the one whose averaged score is exactly it
    probs = torch.from_numpy(seen["matched_logits"]).softmax(-1)[:, :-1]
    queries = torch.tensor([int((probs[:, c] == s).nonzero()[0, 0]) for s, c in zip(scores, labels)])
    order = torch.argsort(scores, descending=True)  # MinVIS's topk(sorted=False): store best first
    return {
        "minvis_clip": clip,
        "minvis_input": np32(seen["input"][0]),
        "minvis_pred_logits": np32(head["pred_logits"][0]),  # [T, Q, 41]
        "minvis_pred_masks": np32(head["pred_masks"][0].transpose(0, 1)),  # [T, Q, 16, 16]
        "minvis_pred_embds": np32(head["pred_embds"][0].permute(1, 2, 0)),  # [T, Q, 256]
        "minvis_perms": np.stack(seen["perms"]),  # [T-1, Q]: frame t+1's queries aligned to frame t's
        "minvis_matched_logits": seen["matched_logits"],  # [Q, 41]
        "minvis_top_scores": scores[order].numpy().astype(np.float32),
        "minvis_top_labels": labels[order].numpy(),
        "minvis_top_queries": queries[order].numpy(),
        "minvis_masks": np.packbits(masks[order.numpy()], axis=-1),  # [10, T, H, ceil(W/8)]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectron2", type=Path, required=True, help="facebookresearch/detectron2 checkout")
    p.add_argument("--mask2former", type=Path, required=True, help="facebookresearch/Mask2Former checkout")
    p.add_argument("--minvis", type=Path, required=True, help="NVlabs/MinVIS checkout")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "golden_minvis.npz")
    a = p.parse_args()
    torch.set_num_threads(1)
    import_references(a.detectron2.resolve(), a.mask2former.resolve(), a.minvis.resolve())
    image, clip = test_images()
    with tempfile.TemporaryDirectory() as d:
        out = {**coco_reference(a.mask2former.resolve(), Path(d), image),
               **minvis_reference(a.mask2former.resolve(), a.minvis.resolve(), Path(d), clip)}
    out.update(commits=np.array([f"detectron2 {git_head(a.detectron2)}", f"Mask2Former {git_head(a.mask2former)}",
                                 f"MinVIS {git_head(a.minvis)}"]),
               seeds=np.array([COCO_SEED, MINVIS_SEED]))
    np.savez_compressed(a.out, **out)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB): " + ", ".join(
        f"{k} {list(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
