"""The accuracy benchmark's bookkeeping (the training runs themselves are tested in test_pipeline)."""
import cv2
import pytest

from svis_ray.benchmark import KEYS, RECIPES, bar_chart, goals, summarize


def seeds(*aps):
    return {"seeds": {str(i): {k: ap for k in KEYS} for i, ap in enumerate(aps)}}


def test_summary_mean_std_over_measured_seeds_only():
    results = summarize({"full": seeds(0.4, 0.6), "svis_ray": seeds(0.5), "sparse_minvis": {"seeds": {}}})
    assert results["full"]["mean"]["AP"] == pytest.approx(0.5)
    assert results["full"]["std"]["AP"] == pytest.approx(0.1)
    assert results["svis_ray"]["std"]["AR10"] == 0.0
    assert "mean" not in results["sparse_minvis"]  # nothing measured yet: no made-up numbers


def test_goals_follow_the_issue():
    def results(full, lab, sm, svis):
        return summarize({"full": seeds(full), "labelled_only": seeds(lab), "sparse_minvis": seeds(sm),
                          "svis_ray": seeds(svis)})

    assert all(goals(results(0.40, 0.30, 0.35, 0.37)).values())
    missed = goals(results(0.40, 0.33, 0.38, 0.37))
    assert missed == {"svis_ray >= 0.9 x full": True, "svis_ray >= labelled_only + 5 AP": False,
                      "svis_ray > sparse_minvis": False}
    assert not goals(results(0.50, 0.30, 0.35, 0.44))["svis_ray >= 0.9 x full"]


def test_bar_chart_draws_every_recipe(tmp_path):
    results = summarize({name: seeds(0.1 * (i + 1)) for i, name in enumerate(RECIPES)})
    bar_chart(results, tmp_path / "accuracy.png")
    img = cv2.imread(str(tmp_path / "accuracy.png"))
    assert img is not None and img.shape[1] == 120 + 140 * len(RECIPES)


def test_seeds_are_a_comma_list():
    from svis_ray.benchmark import parse_seeds
    from svis_ray.errors import SvisError

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    with pytest.raises(SvisError, match="--seeds"):
        parse_seeds("0 1")


def test_a_recipes_own_keys_win_over_command_line_overrides(tmp_path):
    from svis_ray.benchmark import recipe_config

    over = ["teacher.warmup_steps=50", "pseudo.weight=0.5", "train.max_steps=200", "train.milestones=[160]"]
    sm = recipe_config("sparse_minvis", "data", 1, over, tmp_path)
    assert (sm.teacher.mode, sm.teacher.warmup_steps, sm.pseudo.weight, sm.pseudo.anchor) == ("online", 0, 1.0, False)
    assert sm.train.max_steps == 200 and sm.train.seed == 1
    svis = recipe_config("svis_ray", "data", 1, over, tmp_path)
    assert (svis.teacher.warmup_steps, svis.pseudo.weight) == (50, 0.5)  # nothing pinned: overrides apply
    assert recipe_config("full", "data", 0, over, tmp_path).pseudo.weight == 0


def test_concurrency_benchmark_configs_load(tmp_path):
    """bench/concurrency.py builds its three runs from debug.yaml plus overrides; a config check
    added later must not break them (a score threshold of 1.1 once did)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "concurrency.py"
    spec = importlib.util.spec_from_file_location("bench_concurrency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfgs = bench.run_configs(str(tmp_path), 60, str(tmp_path / "teacher.pt"))
    assert cfgs["concurrent"].teacher.mode == cfgs["teacher_only"].teacher.mode == "frozen"
    student = cfgs["student_only"]
    assert student.teacher.mode == "online" and not student.pseudo.anchor
    assert student.pseudo.score_threshold == 1.0  # kept only when a score exceeds it: never
    assert len({c.output.dir for c in cfgs.values()}) == 3


def test_teacher_settings_do_not_count_for_recipes_without_that_teacher(tmp_path):
    from svis_ray.benchmark import comparable, recipe_config

    svis = comparable(recipe_config("svis_ray", "a", 0, [], tmp_path))
    assert svis["teacher.mode"] == "ema" and "teacher.ema_momentum" in svis
    assert "data.root" not in svis and "train.seed" not in svis and "output.dir" not in svis
    sm = [comparable(recipe_config("sparse_minvis", root, seed, [f"teacher.ema_momentum={m}"], tmp_path / root))
          for root, seed, m in (("a", 0, 0.9), ("b", 1, 0.5))]
    assert sm[0] == sm[1]  # another folder, seed and EMA momentum: trained the same way
    # Sparse-MinVIS had no pseudo-label NMS, whatever the overrides
    assert comparable(recipe_config("sparse_minvis", "a", 0, ["pseudo.nms_iou=0.5"], tmp_path)) == sm[0]
    assert comparable(recipe_config("svis_ray", "a", 0, ["pseudo.nms_iou=0.5"], tmp_path)) != svis
    assert comparable(recipe_config("sparse_minvis", "a", 0, ["train.lr=0.01"], tmp_path)) != sm[0]
    # strong augmentation acts on teacher-labelled frames only: nothing to change without a teacher
    assert comparable(recipe_config("sparse_minvis", "a", 0, ["pseudo.strong_aug=true"], tmp_path)) == sm[0]
    assert comparable(recipe_config("svis_ray", "a", 0, ["pseudo.strong_aug=true"], tmp_path)) != svis


def test_reuse_takes_only_results_trained_the_same_way(tmp_path, monkeypatch):
    import json

    import svis_ray.train

    from svis_ray.benchmark import comparable, data_fingerprint, make_benchmark_data, recipe_config, reused, run
    from svis_ray.errors import SvisError

    data = tmp_path / "data"
    make_benchmark_data(data)
    old = tmp_path / "old" / "accuracy.json"
    old.parent.mkdir()
    prev = summarize({name: seeds(*(0.1 * (i + 1) + 0.01 * s for s in range(3))) for i, name in enumerate(RECIPES)})
    for name in RECIPES:
        prev[name].update(config=comparable(recipe_config(name, str(data), 0, [], tmp_path)),
                          data_sha256=data_fingerprint(str(data)))
    old.write_text(json.dumps(prev))

    # nothing to train: every recipe comes from the old file, on freshly generated demo data
    assert run(str(tmp_path / "new"), [0, 2], [], recipes=[], reuse=str(old)) == 0  # these numbers meet the goals
    new = json.loads((tmp_path / "new" / "accuracy.json").read_text())
    assert list(new) == list(RECIPES) and list(new["full"]["seeds"]) == ["0", "2"]
    assert new["svis_ray"]["mean"]["AP"] == pytest.approx(0.41) and new["full"]["reused_from"] == str(old)

    config, fp = prev["full"]["config"], prev["full"]["data_sha256"]
    with pytest.raises(SvisError, match=r"different config \(train.lr\)"):
        reused(str(old), "full", [0], {**config, "train.lr": 0.5}, fp)
    with pytest.raises(SvisError, match="different demo data"):
        reused(str(old), "full", [0], config, "0" * 64)
    # seeds the old file lacks are trained (here a stand-in for training), every recipe, nothing else
    trained = []

    def fake_training(cfg):
        trained.append((cfg.output.dir.split("/")[-1], cfg.train.seed))
        return {"metrics": dict.fromkeys(KEYS, 0.5)}

    monkeypatch.setattr(svis_ray.train, "run_training", fake_training)
    assert reused(str(old), "full", [0, 3], config, fp)["seeds"] == {"0": prev["full"]["seeds"]["0"]}
    assert run(str(tmp_path / "five"), [0, 1, 2, 3, 4], [], reuse=str(old)) == 0
    assert sorted(seed for _, seed in trained) == [3] * 4 + [4] * 4 and len(set(trained)) == 8
    five = json.loads((tmp_path / "five" / "accuracy.json").read_text())
    assert list(five["full"]["seeds"]) == ["0", "1", "2", "3", "4"] and five["full"]["reused_seeds"] == ["0", "1", "2"]
    assert five["full"]["mean"]["AP"] == pytest.approx((0.1 + 0.11 + 0.12 + 0.5 + 0.5) / 5)
    # a key added since the old run: the same at its default (the old behaviour), not otherwise
    prev["full"]["config"] = {k: v for k, v in config.items() if k != "pseudo.nms_iou"}
    old.write_text(json.dumps(prev))
    assert reused(str(old), "full", [0], config, fp)["seeds"] == {"0": prev["full"]["seeds"]["0"]}
    with pytest.raises(SvisError, match=r"different config \(pseudo.nms_iou\)"):
        reused(str(old), "full", [0], {**config, "pseudo.nms_iou": 0.5}, fp)
    del prev["full"]["config"]
    old.write_text(json.dumps(prev))
    with pytest.raises(SvisError, match="no reusable full entry"):
        reused(str(old), "full", [0], config, fp)
    with pytest.raises(SvisError, match="unknown recipe"):
        run(str(tmp_path / "new"), [0], [], recipes=["svis"], reuse=str(old))
    with pytest.raises(SvisError, match="every recipe would be retrained"):
        run(str(tmp_path / "new"), [0], [], recipes=list(RECIPES), reuse=str(old))
