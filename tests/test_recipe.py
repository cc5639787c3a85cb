"""The R50 configs are MinVIS's YTVIS19 R50 recipe (docs/recipe.md; MinVIS
configs/youtubevis_2019/video_maskformer2_R50_bs32_8ep_frame.yaml and its base)."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from svis_ray.config import load_config
from svis_ray.data.ingest import clip_rows
from svis_ray.data.transforms import resized_shape
from svis_ray.data.ytvis import YTVIS
from svis_ray.model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
FULL, ONE = (load_config(ROOT / "configs" / name) for name in ("ytvis19_r50_full.yaml", "ytvis19_r50_1frame.yaml"))


@pytest.mark.parametrize("cfg", [FULL, ONE], ids=["full", "1frame"])
def test_minvis_recipe_values(cfg):
    d, t, loss = cfg.data, cfg.train, cfg.loss
    videos_per_step = t.num_workers * d.clips_per_step
    assert videos_per_step == 32  # SOLVER.IMS_PER_BATCH 32, one frame of each (SAMPLING_FRAME_NUM 1)
    assert (t.max_steps, t.milestones, t.gamma, t.warmup_steps) == (6000, [4000], 0.1, 10)
    assert (t.lr, t.weight_decay, t.backbone_multiplier, t.clip_norm) == (1e-4, 0.05, 0.1, 0.01)
    assert t.precision == "bf16"  # MinVIS trains with AMP (fp16); bf16 is as cheap and needs no loss scaling
    assert (d.min_size_train, d.max_size_train, d.min_size_test, d.max_size_test, d.flip) == \
        ([360, 480], 1333, 360, 1333, True)
    assert (loss.class_weight, loss.mask_weight, loss.dice_weight, loss.eos_coef) == (2.0, 5.0, 5.0, 0.1)
    assert (loss.num_points, loss.oversample_ratio, loss.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert (cfg.inference.tracker, cfg.inference.topk) == ("minvis", 10)
    assert cfg.model.preset == "minvis_r50" and cfg.model.weights.endswith("model_final_3c8ec9.pkl")
    model = dataclasses.replace(PRESETS[cfg.model.preset], **cfg.model.overrides)  # what build_model builds
    assert model.freeze_at == 0 and model.backbone_norm == "frozen_bn" and model.backbone == "resnet50"
    assert (model.num_queries, model.dec_layers, model.enc_layers, model.hidden_dim, model.mask_dim) == \
        (100, 9, 6, 256, 256)
    assert (model.nheads, model.dim_feedforward, model.enc_dim_feedforward, model.enc_n_points) == (8, 2048, 1024, 4)


def test_full_trains_one_frame_of_32_videos_on_all_of_train():
    assert FULL.data.train_json == "train.json" and FULL.data.unlabelled_per_clip == 0
    assert FULL.train.num_workers * FULL.data.clips_per_step * (1 + FULL.data.unlabelled_per_clip) == 32
    assert FULL.teacher.mode == "online" and FULL.pseudo.weight == 0.0  # no teacher pool


def test_1frame_adds_one_pseudo_labelled_frame_to_minvis_1pct():
    assert ONE.data.train_json == "train_1frame.json" and ONE.data.unlabelled_per_clip == 1
    assert ONE.train.num_workers * ONE.data.clips_per_step * (1 + ONE.data.unlabelled_per_clip) == 64
    assert ONE.teacher.mode == "ema" and ONE.teacher.num_teachers >= 1


def test_a_step_draws_distinct_videos_and_one_frame_each():
    # 70 videos of 5 frames, every frame labelled: 3 steps of 32 clips cross a pass boundary
    videos = [{"id": i + 1, "width": 8, "height": 8, "length": 5, "file_names": [f"v{i}/{t}.jpg" for t in range(5)]}
              for i in range(70)]
    ds = YTVIS({"videos": videos, "annotations": [], "categories": [{"id": 1, "name": "a"}]}, source="toy")
    rows = clip_rows(ds, "/data", 96, 1 + FULL.data.unlabelled_per_clip, seed=0)
    assert all(len(r["frame_idx"]) == 1 for r in rows)
    for step in range(2):  # within a pass a step's 32 clips are 32 different videos
        assert len({r["video_id"] for r in rows[32 * step:32 * step + 32]}) == 32
    assert len({r["frame_idx"][0] for r in rows}) > 1  # any frame of the video, not a fixed one


def test_sizes_round_as_detectron2():
    assert resized_shape(720, 1280, 360, 1333) == (360, 640)
    assert resized_shape(720, 1280, 480, 1333) == (480, 853)  # 853.33
    assert resized_shape(1080, 1920, 360, 1333) == (360, 640)
    assert resized_shape(100, 300, 15, 1333) == (15, 45)
    assert resized_shape(60, 90, 33, 1333) == (33, 50)  # 49.5 rounds up, as int(x + 0.5)


def _table_rows() -> list[tuple[str, str]]:
    """(svis-ray key, value) of docs/recipe.md rows that name a config key or a preset field."""
    rows = []
    for line in (ROOT / "docs" / "recipe.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"(preset|data|train|loss|model|inference)\.[a-z_]+", cells[3]):
            rows.append((cells[3], cells[4]))
    return rows


def test_docs_table_states_the_config_values():
    rows = _table_rows()
    assert len(rows) >= 35
    for key, text in rows:
        expected = yaml.safe_load(text)
        section, name = key.split(".")
        if section == "preset":
            assert getattr(PRESETS["minvis_r50"], name) == expected, key
            continue
        for cfg in (FULL, ONE):
            value = getattr(getattr(cfg, section), name)
            if key == "data.train_json" and cfg is ONE:
                assert value == "train_1frame.json"  # the 1-frame subset (its own section in the doc)
            elif key == "data.unlabelled_per_clip" and cfg is ONE:
                assert value == 1
            else:
                assert value == expected, (key, value, expected)
