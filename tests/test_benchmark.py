"""The accuracy benchmark's bookkeeping (the training runs themselves are tested in test_pipeline)."""
import cv2
import os

import pytest

from svis_ray.benchmark import KEYS, RECIPES, bar_chart, goals, recovered, summarize


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
        return summarize({"full": seeds(*full), "labelled_only": seeds(*lab), "sparse_minvis": seeds(*sm),
                          "svis_ray": seeds(*svis)})

    good = results((0.24, 0.24), (0.16, 0.16), (0.18, 0.18), (0.23, 0.23))  # recovered 0.875
    assert all(goals(good).values()) and recovered(good) == pytest.approx(0.875)
    missed = goals(results((0.24,), (0.16,), (0.18,), (0.22,)))  # recovered 0.75: enough on other data only
    assert [k for k, ok in missed.items() if not ok] == ["recovered >= 0.85"]
    assert all(goals(results((0.24,), (0.16,), (0.18,), (0.22,)), "creatures").values())
    # one seed below labelled-only fails, even when the mean is above it
    one_seed = goals(results((0.24, 0.24), (0.16, 0.20), (0.17, 0.17), (0.25, 0.19)), "creatures")
    assert [k for k, ok in one_seed.items() if not ok] == ["svis_ray >= labelled_only on every seed"]
    # not learnable (full under 20 AP) or labels do not matter (gap under 4 AP)
    weak = goals(results((0.12,), (0.05,), (0.06,), (0.11,)), "creatures")
    assert [k for k, ok in weak.items() if not ok] == ["full >= 20 AP"]
    flat = goals(results((0.24,), (0.22,), (0.21,), (0.24,)), "creatures")
    assert not flat["full >= labelled_only + 4 AP"] and flat["svis_ray > sparse_minvis"]
    assert recovered(results((0.2,), (0.2,), (0.2,), (0.2,))) is None


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
    # these made-up numbers miss issue 30's goals (full below 20 AP): exit 1, results still written
    assert run(str(tmp_path / "new"), [0, 2], [], recipes=[], reuse=str(old)) == 1
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
    assert run(str(tmp_path / "five"), [0, 1, 2, 3, 4], [], reuse=str(old)) == 1  # made-up numbers: goals missed
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


def test_benchmark_on_a_users_data_splits_sparsifies_and_scales_the_frame_size(tmp_path, monkeypatch):
    """--data: the split, the 1-frame subset and the frame-size keys the four recipes train with
    (training itself replaced by a stand-in here; the end-to-end run is below)."""
    import json

    import svis_ray.train
    from svis_ray.benchmark import BenchData, run
    from svis_ray.data.creatures import make_creatures_data
    from svis_ray.errors import SvisError

    mine = tmp_path / "mine"
    make_creatures_data(mine, videos=10, val_videos=1, frames=7, size=(40, 72))
    trained = []

    def fake_training(cfg):
        trained.append(cfg)
        return {"metrics": dict.fromkeys(KEYS, 0.3 if "full" in cfg.output.dir else 0.1)}

    monkeypatch.setattr(svis_ray.train, "run_training", fake_training)
    out = tmp_path / "out"
    assert run(str(out), [0], [], bench=BenchData(family=None, root=str(mine), val_fraction=0.3)) == 1  # goals missed
    data = out / "data"
    train, val = (json.loads((data / f"{n}.json").read_text()) for n in ("train", "val"))
    assert (len(train["videos"]), len(val["videos"])) == (7, 3)
    sparse = json.loads((data / "train_1frame.json").read_text())
    assert all(len(v["labelled_frames"]) == 1 for v in sparse["videos"])
    assert (data / "JPEGImages").resolve() == (mine / "JPEGImages").resolve()
    by_name = {c.output.dir.split("/")[-1]: c for c in trained}
    assert sorted(by_name) == sorted(f"{r}_seed0" for r in RECIPES)
    for c in trained:  # the frames' short side; the long side fits under the debug config's cap
        assert (c.data.min_size_train, c.data.min_size_test, c.data.max_size_test) == ([40], 40, 256)
        assert c.data.root == str(data)
    assert by_name["full_seed0"].data.train_json == "train.json"
    assert by_name["svis_ray_seed0"].data.train_json == "train_1frame.json"
    result = json.loads((out / "accuracy.json").read_text())
    assert result["full"]["mean"]["AP"] == pytest.approx(0.3)

    # sizes from the command line win; a user's own val file is taken as it is
    trained.clear()
    bench = BenchData(family=None, root=str(mine), train_json="train.json", val_json="val.json", min_size=32, max_size=64)
    run(str(tmp_path / "out2"), [1], ["train.lr=0.01"], recipes=["svis_ray"], bench=bench)
    (c,) = trained
    assert (c.data.min_size_train, c.data.max_size_train, c.train.lr) == ([32], 64, 0.01)
    assert len(json.loads((tmp_path / "out2" / "data" / "val.json").read_text())["videos"]) == 1
    with pytest.raises(SvisError, match="holding JPEGImages"):
        run(str(tmp_path / "out3"), [0], [], bench=BenchData(family=None, root=str(tmp_path)))
    with pytest.raises(SvisError, match="needs full labels"):
        run(str(tmp_path / "out4"), [0], [], bench=BenchData(family=None, root=str(mine), val_json=str(data / "train_1frame.json")))


def test_frame_size_keys_leave_the_shapes_familys_config_as_it_was(tmp_path):
    from svis_ray.benchmark import BenchData, size_overrides
    from svis_ray.data.demo import make_demo_data

    make_demo_data(tmp_path, videos=1, val_videos=1, frames=2)
    assert size_overrides(BenchData(), tmp_path) == ["data.min_size_train=[96]", "data.min_size_test=96",
                                                     "data.max_size_train=256", "data.max_size_test=256"]


@pytest.mark.ray
@pytest.mark.skipif(not os.environ.get("SVIS_SLOW_TESTS"), reason="8 Ray Train launches; SVIS_SLOW_TESTS=1 runs it")
@pytest.mark.slow  # 8 Ray Train launches (4 recipes x train + eval): 485 s at load 37 on 2 cores
@pytest.mark.timeout(900)
def test_benchmark_command_runs_end_to_end_on_a_users_data(ray_local, tmp_path, capsys):
    """``svis-ray benchmark --data`` on tiny creatures data, 2 steps a recipe: every recipe trains
    and is evaluated, the table and the goal checks are printed, and the missed goals exit 2."""
    import json

    from svis_ray.cli import main
    from svis_ray.data.creatures import make_creatures_data

    make_creatures_data(tmp_path / "mine", videos=6, val_videos=1, frames=6, size=(48, 80))
    code = main(["benchmark", "--data", str(tmp_path / "mine"), "--val-fraction", "0.5", "--out", str(tmp_path / "out"), "--seeds", "0",
                 "train.max_steps=2", "train.milestones=[]", "train.checkpoint_every=2", "train.log_every=1",
                 "teacher.warmup_steps=0", "teacher.publish_every=1", "pseudo.ramp_steps=0", "pseudo.refine=none",
                 "data.clips_per_step=1", "loss.num_points=256", "output.progress_bar=false"])
    out = capsys.readouterr().out
    assert code == 2 and "FAIL: full >= 20 AP" in out and "recovered" in out
    result = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert list(result) == list(RECIPES) and all("0" in r["seeds"] for r in result.values())
    assert (tmp_path / "out" / "accuracy.png").is_file()
