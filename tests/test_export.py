"""``svis-ray export`` and ``predict --onnx``: onnxruntime gives PyTorch's outputs and tracks.

Parity: a trained tiny demo checkpoint and ``minvis_r50`` with seeded weights, exported with
``--dynamic``, match PyTorch eager (max abs diff <= 1e-3 on class and mask logits) at two input
sizes and batch sizes; the tiny model's tracks on the demo held-out split are the same through
``predict --onnx`` as through ``predict --checkpoint``.
"""
import json

import numpy as np
import onnx
import pycocotools.mask as mask_util
import pytest
import torch

from svis_ray.cli import main
from svis_ray.data.transforms import resize_image
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.deploy import ONNX_FORMAT, OnnxModel, export_onnx
from svis_ray.errors import SvisError
from svis_ray.eval import evaluate_files
from svis_ray.losses import SetCriterion
from svis_ray.matcher import HungarianMatcher
from svis_ray.model import build_model, load_model, preprocess, preprocess_frames, save_checkpoint
from svis_ray.optim import build_optimizer, build_scheduler, train_step
from svis_ray.predict import predict

TOL = 1e-3
TEST_SIZES = {"min_size_test": 96, "max_size_test": 128}  # the demo frames' own size


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """The tiny preset trained 40 steps on the demo training videos (all frames labelled): confident
    enough that its masks are not a sea of logits near 0, as an untrained model's are."""
    torch.manual_seed(0)
    split = YTVIS.load(demo_root / "train.json")
    frames, targets = [], []
    for video in split.videos:
        for t, path in enumerate(split.frame_paths(video["id"], demo_root)):
            frames.append(torch.from_numpy(decode_frame(path)).permute(2, 0, 1))
            tg = split.targets(video["id"], t)
            targets.append({"labels": torch.as_tensor(tg["labels"]), "masks": torch.as_tensor(tg["masks"])})
    images = preprocess(torch.stack(frames), [f.shape[1:] for f in frames])
    model = build_model("tiny", len(split.class_names))
    criterion = SetCriterion(len(split.class_names), HungarianMatcher(num_points=1024), num_points=1024)
    steps = 40
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = build_scheduler(optimizer, steps, milestones=(steps,))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:4].tolist()
        train_step(model, criterion, optimizer, scheduler, images[idx], [targets[i] for i in idx])
    path = tmp_path_factory.mktemp("trained") / "best.pt"
    save_checkpoint(path, model.eval(), split.class_names, extra={"step": steps, "tracker": "svis", **TEST_SIZES})
    return path


@pytest.fixture(scope="module")
def tiny_onnx(trained, tmp_path_factory):
    """The trained checkpoint exported through the CLI with dynamic spatial axes."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out), "--dynamic"]) == 0
    return out


def _demo_frames(demo_root, shape: tuple[int, int], n: int) -> list[np.ndarray]:
    """n demo validation frames resized to ``shape`` (real images, not noise: realistic activations)."""
    split = YTVIS.load(demo_root / "val.json")
    paths = [p for v in split.videos for p in split.frame_paths(v["id"], demo_root)]
    return [resize_image(decode_frame(p), shape) for p in paths[:n]]


def _max_diffs(model: torch.nn.Module, runtime: OnnxModel, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        ref = model(x)
    got = runtime(x)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(ref[k].shape) for k in got}
    return {k: float((got[k] - ref[k]).abs().max()) for k in got}


def test_export_writes_a_checked_model_with_the_metadata_predict_needs(tiny_onnx, trained):
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    _, info = load_model(trained)
    assert meta["svis_ray.format"] == ONNX_FORMAT
    assert meta["svis_ray.class_names"] == info["class_names"]
    assert meta["svis_ray.extra"] == {"step": 40, "tracker": "svis", **TEST_SIZES}
    assert meta["svis_ray.pixel_mean"] == [123.675, 116.28, 103.53]
    assert meta["svis_ray.pixel_std"] == [58.395, 57.12, 57.375]
    assert meta["svis_ray.config"]["num_queries"] == 20 and meta["svis_ray.input_size"] is None
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", 3, "height", "width"]]
    assert not list(tiny_onnx.parent.glob(".*.tmp"))  # written through a temp file, renamed


def test_tiny_onnx_matches_eager_at_two_sizes(tiny_onnx, trained, demo_root):
    model, _ = load_model(trained)
    runtime = OnnxModel(tiny_onnx)
    for shape, batch in (((96, 128), 3), ((160, 96), 1)):
        x = preprocess_frames(_demo_frames(demo_root, shape, batch))
        diffs = _max_diffs(model.eval(), runtime, x)
        assert diffs["pred_logits"] <= TOL and diffs["pred_masks"] <= TOL and diffs["pred_embds"] <= TOL, (shape, diffs)


def test_fixed_size_export_pads_smaller_frames_up_to_its_size(trained, demo_root, tmp_path):
    out = tmp_path / "fixed.onnx"
    export_onnx(trained, out, height=96, width=128)  # no --dynamic: 96x128 only
    runtime = OnnxModel(out)
    assert runtime.input_size == (96, 128)
    small = preprocess_frames(_demo_frames(demo_root, (64, 96), 2))
    model, _ = load_model(trained)
    with torch.no_grad():  # what the fixed model computes: the frame zero-padded to 96x128
        ref = model.eval()(torch.nn.functional.pad(small, (0, 32, 0, 32)))
    got = runtime(small)
    assert got["pred_masks"].shape[-2:] == (16, 24)  # cropped back to the frame's stride-4 area
    assert float((got["pred_masks"] - ref["pred_masks"][..., :16, :24]).abs().max()) <= TOL
    assert float((got["pred_logits"] - ref["pred_logits"]).abs().max()) <= TOL
    with pytest.raises(SvisError, match="do not fit this fixed-size ONNX model"):
        runtime(preprocess_frames(_demo_frames(demo_root, (128, 96), 1)))


@pytest.mark.timeout(600)
def test_r50_seeded_onnx_matches_eager_at_two_sizes(minvis_pth, tmp_path):
    names = [f"class_{i}" for i in range(40)]
    out = tmp_path / "r50.onnx"
    export_onnx(minvis_pth, out, height=64, width=96, dynamic=True, class_names=names)
    model, _ = load_model(minvis_pth, "cpu", names)
    runtime = OnnxModel(out)
    assert runtime.info["class_names"] == names and runtime.info["extra"]["tracker"] == "minvis"
    gen = torch.Generator().manual_seed(0)
    for shape, batch in (((64, 96), 2), ((96, 64), 1)):  # small sizes: R50 on 2 shared cores
        frames = [torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=gen) for _ in range(batch)]
        diffs = _max_diffs(model.eval(), runtime, preprocess_frames(frames))
        assert diffs["pred_logits"] <= TOL and diffs["pred_masks"] <= TOL, (shape, diffs)


def _masks(record: dict) -> np.ndarray:
    """[T, H, W] bool of a results.json record (an empty frame where it has no RLE)."""
    return np.stack([mask_util.decode(rle).astype(bool) for rle in record["segmentations"]])


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_predict_onnx_gives_the_tracks_of_predict_checkpoint(ray_local, demo_root, trained, tiny_onnx, tmp_path):
    split = demo_root / "val.json"
    runs = {}
    for name, path in (("checkpoint", trained), ("onnx", tiny_onnx)):
        summary = predict(path, split, tmp_path / name, num_actors=1, log=lambda line: None)
        assert summary["videos"] == 2 and summary["tracker"] == "svis"
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text()),
                      evaluate_files(split, tmp_path / name / "results.json"))
    (torch_records, torch_metrics), (onnx_records, onnx_metrics) = runs["checkpoint"], runs["onnx"]
    # the same top-10 (video, class) choices in the same order, scores and masks all but equal
    assert [(r["video_id"], r["category_id"]) for r in onnx_records] == \
        [(r["video_id"], r["category_id"]) for r in torch_records]
    assert [r["score"] for r in onnx_records] == pytest.approx([r["score"] for r in torch_records], abs=1e-3)
    for a, b in zip(onnx_records, torch_records):
        ma, mb = _masks(a), _masks(b)
        union = (ma | mb).sum()
        assert union == 0 or (ma & mb).sum() / union >= 0.99
    assert torch_metrics["AP"] > 0  # trained: the comparison is between real tracks
    assert abs(onnx_metrics["AP"] - torch_metrics["AP"]) <= 0.1


def test_a_corrupt_or_foreign_onnx_file_fails_in_one_line(demo_root, tmp_path, capsys):
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf at all")
    foreign = tmp_path / "identity.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
              str(foreign))
    frames = next((demo_root / "JPEGImages").iterdir())
    expected = {corrupt: "unreadable or corrupt ONNX model", foreign: "not an svis-ray ONNX model",
                tmp_path / "missing.onnx": "ONNX model not found", tmp_path / "model.pt": "--onnx takes a .onnx file"}
    for path, message in expected.items():
        assert main(["predict", str(frames), "--onnx", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "out" / "results.json").exists()
