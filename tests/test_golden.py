"""svis-ray against the reference implementations: tests/data/golden_minvis.npz holds what
facebookresearch/Mask2Former and NVlabs/MinVIS (on detectron2, commits in the file) compute with
seeded weights laid out as the public checkpoints; tools/make_golden.py wrote it. Here the same
seeded weights go through ``load_pretrained`` and svis-ray's model, preprocessing and MinVIS
inference must give the same numbers: mask and class logits within 1e-4, the same tracks and
top-10 choices."""
from pathlib import Path

import numpy as np
import pytest
import torch

from svis_ray.model import build_model, load_pretrained, preprocess_frames
from svis_ray.model.seeded import COCO_PKL_KEYS, key_list, seeded_state_dict, write_detectron2_pkl
from svis_ray.tracking import match_embeddings, track_video

GOLDEN = np.load(Path(__file__).parent / "data" / "golden_minvis.npz")
TOL = 1e-4


def close(got: torch.Tensor, expected: np.ndarray, name: str, tol: float = TOL) -> None:
    diff = float((got.detach().float() - torch.from_numpy(expected)).abs().max())
    assert got.shape == expected.shape and diff <= tol, f"{name}: max abs diff {diff:.2e} (shape {tuple(got.shape)})"


@pytest.fixture(scope="module")
def coco_model(tmp_path_factory):
    """Mask2Former COCO R50 layout (.pkl, static_query, 81-way head), seed 0, as the fixture."""
    path = write_detectron2_pkl(tmp_path_factory.mktemp("coco") / "model_final_3c8ec9.pkl",
                                seeded_state_dict(key_list(COCO_PKL_KEYS), seed=int(GOLDEN["seeds"][0])))
    model = build_model("minvis_r50", 80)
    report = load_pretrained(model, path)
    assert report["skipped"] == [] and report["ignored"] == ["criterion.empty_weight"]
    return model.eval()


@pytest.fixture(scope="module")
def video_model(minvis_pth):
    model = build_model("minvis_r50", 40)
    report = load_pretrained(model, minvis_pth)
    assert report["skipped"] == []
    return model.eval()


def test_fixture_names_its_reference_commits():
    commits = " ".join(GOLDEN["commits"].tolist())
    for repo in ("detectron2", "Mask2Former", "MinVIS"):
        assert f"{repo} " in commits and "unknown" not in commits


@torch.no_grad()
def test_preprocessing_matches_detectron2_normalise_then_pad():
    x = preprocess_frames([GOLDEN["coco_image"]])
    close(x, GOLDEN["coco_input"], "coco input", 1e-5)
    assert not x[..., 52:, :].any() and not x[..., 60:].any()  # the padding is exactly 0
    close(preprocess_frames(list(GOLDEN["minvis_clip"])), GOLDEN["minvis_input"], "clip input", 1e-5)


@torch.no_grad()
def test_pixel_decoder_and_every_decoder_layer_match_mask2former(coco_model):
    x = preprocess_frames([GOLDEN["coco_image"]])
    mask_features, multi_scale = coco_model.sem_seg_head["pixel_decoder"](coco_model.backbone(x))
    close(mask_features, GOLDEN["coco_mask_features"], "mask_features")
    for i, m in enumerate(multi_scale):
        close(m, GOLDEN[f"coco_multi_scale_{i}"], f"multi_scale[{i}]")
    out = coco_model.sem_seg_head["predictor"](multi_scale, mask_features)
    layers = out["aux_outputs"] + [out]
    assert len(layers) == len(GOLDEN["coco_pred_logits"]) == 10  # learnable queries + 9 layers
    for i, layer in enumerate(layers):
        close(layer["pred_logits"], GOLDEN["coco_pred_logits"][i], f"layer {i} pred_logits")
        close(layer["pred_masks"], GOLDEN["coco_pred_masks"][i], f"layer {i} pred_masks")
    close(coco_model(x)["pred_masks"], GOLDEN["coco_pred_masks"][-1], "forward pred_masks")


@torch.no_grad()
def test_minvis_frames_matching_and_video_inference_match_minvis(video_model):
    clip = list(GOLDEN["minvis_clip"])
    out = video_model(preprocess_frames(clip))
    close(out["pred_logits"], GOLDEN["minvis_pred_logits"], "pred_logits")
    close(out["pred_masks"], GOLDEN["minvis_pred_masks"], "pred_masks")
    close(out["pred_embds"], GOLDEN["minvis_pred_embds"], "pred_embds")
    # MinVIS matching: each frame's queries aligned to the previous frame's (aligned) order
    embds, perms = out["pred_embds"], []
    for t in range(1, len(clip)):
        perms.append(match_embeddings(embds[t - 1], embds[t], mask_weight=0.0))
        embds[t] = embds[t][perms[-1]]
    np.testing.assert_array_equal(torch.stack(perms).numpy(), GOLDEN["minvis_perms"])

    h, w = clip[0].shape[:2]
    tracks = track_video(video_model, clip, topk=10, out_size=(h, w), tracker="minvis")
    assert [(t["query"], t["label"]) for t in tracks] == list(zip(GOLDEN["minvis_top_queries"].tolist(),
                                                                  GOLDEN["minvis_top_labels"].tolist()))
    close(torch.tensor([t["score"] for t in tracks]), GOLDEN["minvis_top_scores"], "top-10 scores", 1e-5)
    masks = np.unpackbits(GOLDEN["minvis_masks"], axis=-1, count=w).astype(bool)
    np.testing.assert_array_equal(np.stack([t["masks"] for t in tracks]), masks)
