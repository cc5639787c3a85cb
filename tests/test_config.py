import subprocess
import sys
from pathlib import Path

import pytest

from svis_ray.config import Config, config_from_dict, load_config, parse_overrides
from svis_ray.errors import SvisError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                         if not p.name.startswith("tune")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    # keys every config has and scripts rely on
    assert cfg.data.root and cfg.output.dir and cfg.train.max_steps > 0


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(ROOT / "configs" / "debug.yaml",
                      ["train.max_steps=7", "train.milestones=[5]", "data.min_size_train=[64, 80]", "teacher.mode=online",
                       "train.lr=1", "model.weights=null"])
    assert cfg.train.max_steps == 7
    assert cfg.data.min_size_train == [64, 80]
    assert cfg.teacher.mode == "online"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.weights is None


def test_round_trip_through_dict():
    cfg = load_config(ROOT / "configs" / "debug.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, message", [
    (["train.max_step=5"], "train.max_step: unknown key (did you mean 'max_steps'?)"),
    (["train.max_steps=abc"], "train.max_steps: expected int, got 'abc'"),
    (["teacher.mode=mean"], "teacher.mode: expected one of 'ema', 'frozen', 'online', got 'mean'"),
    (["data.min_size_train=360"], "data.min_size_train: expected a list, got 360"),
    (["pseudo.nms_iou=1.5"], "pseudo.nms_iou must lie in [0, 1], got 1.5"),
    (["bogus.key=1"], "bogus: unknown key"),
    (["train.max_steps"], "expected key=value"),
])
def test_bad_keys_fail_with_one_line(override, message):
    with pytest.raises(SvisError) as e:
        load_config(ROOT / "configs" / "debug.yaml", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(SvisError, match="bad.yaml: malformed YAML"):
        load_config(p)
    p.write_text("train:\n  max_steps: 3\n  lr: fast\n")
    with pytest.raises(SvisError, match=r"bad.yaml: train.lr: expected float, got 'fast'"):
        load_config(p)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_defaults_follow_minvis_recipe():
    cfg = Config()
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_multiplier) == (1e-4, 0.05, 0.1)
    assert (cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.eos_coef) == (2, 5, 5, 0.1)
    assert cfg.loss.num_points == 12544 and cfg.train.clip_norm == 0.01
    assert (cfg.pseudo.topk, cfg.pseudo.score_threshold, cfg.pseudo.mask_threshold) == (10, 0.8, 0.0)


def test_cli_wrong_config_key_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "svis_ray", "train", "--config", str(ROOT / "configs" / "debug.yaml"),
                        "train.max_stepz=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("svis-ray: error:") and "max_stepz" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cross_field_checks():
    with pytest.raises(SvisError, match=r"train.milestones \[320\] lie beyond train.max_steps=7"):
        load_config(ROOT / "configs" / "debug.yaml", ["train.max_steps=7"])
    with pytest.raises(SvisError, match="teacher.mode=frozen needs teacher.checkpoint"):
        load_config(ROOT / "configs" / "debug.yaml", ["teacher.mode=frozen"])
    with pytest.raises(SvisError, match="train.num_workers must be >= 1"):
        load_config(ROOT / "configs" / "debug.yaml", ["train.num_workers=0"])


def test_docs_config_md_is_current():
    from svis_ray.config import REFERENCE_COMMAND, reference_markdown

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference_markdown(), f"docs/config.md is stale: regenerate it with `{REFERENCE_COMMAND}`"


def test_every_config_key_is_documented():
    import dataclasses

    from svis_ray.config import field_comments
    from svis_ray.tuning import SweepConfig

    def undocumented(cls, prefix):
        docs = field_comments(cls)
        for f in dataclasses.fields(cls):
            if not docs.get(f.name):
                yield prefix + f.name
            tp = cls.__dataclass_fields__[f.name].default_factory
            if dataclasses.is_dataclass(tp):
                yield from undocumented(tp, f"{prefix}{f.name}.")

    missing = [*undocumented(Config, ""), *undocumented(SweepConfig, "")]
    assert not missing, f"add a comment after these fields in svis_ray/config.py or tuning.py: {missing}"


def test_field_comments_take_the_comment_after_or_above_a_field():
    from svis_ray.config import PseudoConfig, TeacherConfig, field_comments

    docs = field_comments(TeacherConfig)
    assert docs["publish_every"] == "rank 0 publishes the EMA weights every K steps"
    assert docs["max_buffer_mb"].startswith("Object store the training stream may fill") and "\n" not in docs["max_buffer_mb"]
    assert "GrabCut" in field_comments(PseudoConfig)["refine"]


def test_config_command_prints_the_resolved_config_as_yaml(capsys):
    import yaml

    from svis_ray.cli import main

    assert main(["config", "--config", str(ROOT / "configs" / "debug.yaml"), "pseudo.score_threshold=0.7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_dict(printed)
    assert cfg.pseudo.score_threshold == 0.7 and cfg.train.max_steps == 400  # the override and the file's value
    assert cfg.loss.eos_coef == Config().loss.eos_coef  # a default the file does not set
    assert main(["config", "--config", str(ROOT / "configs" / "debug.yaml"), "pseudo.score_treshold=0.7"]) == 2
    assert "did you mean 'score_threshold'" in capsys.readouterr().err
