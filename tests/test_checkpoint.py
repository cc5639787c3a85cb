import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from svis_ray.errors import SvisError
from svis_ray.model import build_model, load_checkpoint, load_pretrained, map_detectron2_key, save_checkpoint

REFERENCE = Path(__file__).parent / "data"  # copies of the shared/reference key lists


def _random_reference(name: str) -> dict[str, np.ndarray]:
    """Random float32 arrays with the names and shapes of a real checkpoint."""
    rng = np.random.default_rng(0)
    shapes = json.loads((REFERENCE / name).read_text())
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def _assert_loaded(model, state: dict, skipped: set[str]):
    own = model.state_dict()
    mapped = {map_detectron2_key(k): k for k in state}
    assert set(own) <= set(mapped)  # every parameter and buffer comes from the file
    for name, tensor in own.items():
        if name not in skipped:
            assert torch.equal(tensor, torch.as_tensor(state[mapped[name]])), name


def test_map_detectron2_key():
    assert map_detectron2_key("backbone.stem.conv1.weight") == "backbone.conv1.weight"
    assert map_detectron2_key("backbone.stem.conv1.norm.running_var") == "backbone.bn1.running_var"
    assert map_detectron2_key("backbone.res2.0.shortcut.weight") == "backbone.layer1.0.downsample.0.weight"
    assert map_detectron2_key("backbone.res5.0.shortcut.norm.bias") == "backbone.layer4.0.downsample.1.bias"
    assert map_detectron2_key("backbone.res4.5.conv3.norm.weight") == "backbone.layer3.5.bn3.weight"
    assert map_detectron2_key("backbone.res3.1.conv2.weight") == "backbone.layer2.1.conv2.weight"
    assert map_detectron2_key("sem_seg_head.predictor.static_query.weight") == "sem_seg_head.predictor.query_feat.weight"
    assert map_detectron2_key("sem_seg_head.pixel_decoder.input_proj.0.1.bias") == "sem_seg_head.pixel_decoder.input_proj.0.1.bias"
    assert map_detectron2_key("criterion.empty_weight") is None


def test_mask2former_coco_pkl_loads_into_40_class_model(tmp_path, caplog):
    state = _random_reference("mask2former_r50_coco_instance.pkl_keys.json")
    path = tmp_path / "model_final_3c8ec9.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "MaskFormer Model Zoo"}, f, protocol=2)
    model = build_model("minvis_r50", 40)
    with caplog.at_level(logging.INFO, logger="svis_ray"):
        report = load_pretrained(model, path)
    skipped = {"sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias"}
    assert report["format"] == "detectron2"
    assert set(report["skipped"]) == skipped
    assert report["ignored"] == ["criterion.empty_weight"]
    assert report["loaded"] == len(state) - 3
    _assert_loaded(model, state, skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "class_embed.weight [81, 256] -> [41, 256]" in warnings[0].getMessage()


def test_minvis_ytvis_pth_loads_with_nothing_skipped(tmp_path):
    state = _random_reference("minvis_ytvis19_r50.pth_keys.json")
    path = tmp_path / "minvis_ytvis19_r50.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    model = build_model("minvis_r50", 40)
    report = load_pretrained(model, path)
    assert report["skipped"] == [] and report["ignored"] == ["criterion.empty_weight"]
    _assert_loaded(model, state, set())


def _tiny_as_detectron2_pkl(tmp_path: Path, protocol: int, drop: str | None = None) -> tuple[Path, dict]:
    """A tiny model's weights as a detectron2-style .pkl (tiny's names need no mapping)."""
    torch.manual_seed(1)
    state = {k: v.numpy() for k, v in build_model("tiny", 3).state_dict().items()
             if drop is None or not k.startswith(drop)}
    path = tmp_path / f"tiny_p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f, protocol=protocol)
    return path, state


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_of_any_pickle_protocol_loads(tmp_path, protocol):
    path, state = _tiny_as_detectron2_pkl(tmp_path, protocol)
    torch.manual_seed(2)
    model = build_model("tiny", 3)
    assert load_pretrained(model, path)["loaded"] == len(state)
    _assert_loaded(model, state, set())


def test_missing_pixel_decoder_is_an_error(tmp_path):
    path, _ = _tiny_as_detectron2_pkl(tmp_path, 2, drop="sem_seg_head.pixel_decoder.")
    with pytest.raises(SvisError, match=r"missing \(e\.g\. sem_seg_head\.pixel_decoder\.") as e:
        load_pretrained(build_model("tiny", 3), path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_pickle_is_refused(tmp_path, suffix):
    pwned = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"x": _Evil(pwned)}}, protocol=2))
    else:
        torch.save({"model": {"x": _Evil(pwned)}}, path)
    with pytest.raises(SvisError, match=r"refused to unpickle 'posix\.system'") as e:
        load_pretrained(build_model("tiny", 3), path)
    assert str(e.value).startswith(str(path))
    assert not pwned.exists()


def test_truncated_or_corrupt_files(tmp_path):
    model = build_model("tiny", 3)
    pkl, _ = _tiny_as_detectron2_pkl(tmp_path, 2)
    pth = tmp_path / "own.pth"
    save_checkpoint(pth, model, ["a", "b", "c"])
    for src in (pkl, pth):
        cut = tmp_path / f"cut{src.suffix}"
        cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        with pytest.raises(SvisError) as e:
            load_pretrained(model, cut)
        assert str(e.value).startswith(f"{cut}: ") and "\n" not in str(e.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SvisError, match="garbage.pth: "):
        load_pretrained(model, garbage)
    with pytest.raises(SvisError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(SvisError, match="not an svis-ray checkpoint"):
        load_checkpoint(pkl)


def test_torchvision_resnet_state_dict(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in resnet.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    model = build_model("tiny", 3, backbone_norm="frozen_bn", backbone_weights=str(path))  # loads at build
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    report = load_pretrained(model, path)
    assert report["format"] == "torchvision"
    assert set(report["ignored"]) == {"fc.weight", "fc.bias"} | {k for k in state if k.endswith("num_batches_tracked")}

    with pytest.raises(SvisError, match="unexpected.*running_mean"):  # GroupNorm has no BN statistics
        load_pretrained(build_model("tiny", 3), path)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(SvisError, match="resnet50.pth: weights do not fit"):
        load_pretrained(model, tmp_path / "resnet50.pth")


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 3, num_queries=9)
    path = tmp_path / "ckpt" / "model.pth"
    save_checkpoint(path, model, ["cat", "dog", "owl"], extra={"step": 12, "metrics": {"AP": 0.25}})
    loaded, info = load_checkpoint(path)
    assert info["config"] == model.config and info["class_names"] == ["cat", "dog", "owl"]
    assert info["extra"] == {"step": 12, "metrics": {"AP": 0.25}}
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        a, b = model.eval()(images), loaded.eval()(images)
    for key in ("pred_logits", "pred_masks", "pred_embds"):
        assert torch.equal(a[key], b[key])

    other = build_model("tiny", 5, num_queries=9)  # own format as pretrained weights, other class count
    report = load_pretrained(other, path)
    assert report["format"] == "svis-ray"
    assert set(report["skipped"]) == {"sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias"}
    with pytest.raises(ValueError):
        save_checkpoint(path, model, ["cat"])
