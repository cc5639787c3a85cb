"""End-to-end tests of the Ray pipeline in local debug mode (CPU, fake GPU slots for teachers)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from svis_ray.config import load_config
from svis_ray.data.sparsify import sparsify

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sparse_root(demo_root, tmp_path_factory):
    """The session demo data plus its 1-labelled-frame subset."""
    sparsify(str(demo_root / "train.json"), str(demo_root / "train_1frame.json"), frames_per_video=1,
             strategy="middle", seed=0)
    return demo_root


def small_config(root, out, *extra):
    return load_config(ROOT / "configs" / "debug.yaml", [
        f"data.root={root}", f"output.dir={out}", "train.max_steps=6", "train.checkpoint_every=3",
        "train.eval_every=3", "train.log_every=1", "teacher.publish_every=2", "teacher.warmup_steps=0",
        "pseudo.ramp_steps=0", "data.clips_per_step=1", "train.milestones=[]", "loss.num_points=1024", *extra])


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(600)
def test_debug_run_two_workers_two_teachers(ray_local, sparse_root, tmp_path, one_torch_thread):
    from svis_ray.train import run_training

    # Teachers ask for one (fake) GPU each and fall back to the CPU.
    cfg = small_config(sparse_root, tmp_path / "run", "teacher.gpus_per_teacher=1", "teacher.num_teachers=2",
                       "train.num_workers=2", "train.max_steps=10", "train.checkpoint_every=5",
                       "train.eval_every=5", "data.clips_per_step=2")
    summary = run_training(cfg)
    run = Path(summary["run_dir"])
    for name in ("best.pt", "results.json", "metrics.json", "metrics.csv", "config.yaml"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    tb.Reload()
    assert [e.step for e in tb.Images("eval/tracks")] == [5, 10]  # the picture of every evaluation
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "AR1", "AR10", "per_category"}
    rows = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    # Concurrency: clips consumed later in the run were pseudo-labelled after the student had
    # already started stepping, i.e. teachers and student ran at the same time.
    first_step = min(float(r["step_start"]) for r in rows)
    assert any(float(r["teacher_time_max"]) > first_step for r in rows)
    assert all(float(r["teacher_time_max"]) <= float(r["time"]) for r in rows)
    # Every pseudo-label records the teacher weight version it came from (lag = steps behind).
    assert all(0 <= float(r["teacher_lag"]) < int(r["step"]) for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert results and {"video_id", "category_id", "score", "segmentations"} <= set(results[0])
    # best.pt is the model that was evaluated (the EMA teacher, not the student): predicting
    # with it reproduces the run's results.json (one_torch_thread: one thread, as the worker ran).
    from svis_ray.data.ingest import load_split
    from svis_ray.inference import predict_split
    from svis_ray.model import load_checkpoint

    model, info = load_checkpoint(run / "best.pt")
    assert info["extra"]["tracker"] == cfg.inference.tracker  # what produced results.json
    assert json.loads((run / "metrics.json").read_text())["tracker"] == cfg.inference.tracker
    again = predict_split(model, load_split(str(sparse_root), "val.json"), str(sparse_root),
                          cfg.data.min_size_test, cfg.data.max_size_test, window=cfg.teacher.window,
                          tracker=info["extra"]["tracker"])
    assert [(r["video_id"], r["category_id"]) for r in results] == [(r["video_id"], r["category_id"]) for r in again]
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in again], rel=1e-5)


# A train worker killed mid-run (worker-group restart from the last checkpoint) is tested on the
# simulated cluster, together with a killed teacher and weight store: tests/test_cluster.py.


@pytest.mark.timeout(600)
def test_rerun_with_same_output_dir_resumes(ray_local, sparse_root, tmp_path):
    from svis_ray.train import run_training

    cfg = small_config(sparse_root, tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2",
                       "train.eval_every=0", "train.num_workers=1", "teacher.num_teachers=1")
    run_training(cfg)
    cfg.train.max_steps = 4
    run_training(cfg)
    steps = [int(r["step"]) for r in read_rows(tmp_path / "run" / "metrics.csv")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.timeout(600)
def test_online_mode_sparse_minvis_recipe(ray_local, sparse_root, tmp_path, monkeypatch):
    """teacher.mode=online: no pool; the student labels its own unlabelled frames (threshold 0
    here so that an untrained student's pseudo-labels are kept and counted), refined by GrabCut
    on the frames of the batch.

    Paths are given relative to the launch folder, as `svis-ray demo` does: Train workers run
    in their own working folder, so the driver must hand them absolute paths."""
    from svis_ray.train import run_training

    monkeypatch.chdir(sparse_root.parent)
    rel_out = os.path.relpath(tmp_path / "run")
    cfg = small_config(sparse_root.name, rel_out, "teacher.mode=online", "train.num_workers=1",
                       "train.max_steps=3", "train.checkpoint_every=3", "pseudo.score_threshold=0.0",
                       "pseudo.min_area=1", "pseudo.refine=grabcut")
    run_training(cfg)
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    # kept and counted; by the third step the barely trained student may have no mask logit > 0 left
    assert len(rows) == 3 and max(float(r["pseudo_per_frame"]) for r in rows) > 0
    assert (tmp_path / "run" / "best.pt").exists()


@pytest.mark.timeout(600)
def test_frozen_teacher_writes_parquet_pseudo_labels(ray_local, sparse_root, tmp_path):
    import pyarrow.parquet as pq

    from svis_ray.data.ytvis import YTVIS
    from svis_ray.model import build_model, save_checkpoint
    from svis_ray.train import run_training

    names = YTVIS.load(sparse_root / "train_1frame.json").class_names
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, build_model("tiny", len(names)), names)
    cfg = small_config(sparse_root, tmp_path / "run", "teacher.mode=frozen", f"teacher.checkpoint={teacher}",
                       "pseudo.store=parquet", "pseudo.score_threshold=0.0", "pseudo.min_area=1",
                       "pseudo.anchor=false", "pseudo.refine=grabcut", "train.num_workers=1",
                       "teacher.num_teachers=1", "train.max_steps=2", "train.checkpoint_every=2",
                       "train.eval_every=0")
    run_training(cfg)
    table = pq.read_table(tmp_path / "run" / "pseudo_labels").to_pandas()
    assert len(table) > 0
    assert set(table.columns) >= {"video_id", "frame", "label", "score", "anchored", "teacher_version", "rle"}
    assert (table["teacher_version"] == 0).all()


@pytest.mark.timeout(600)
def test_corrupt_frame_stops_the_run_with_its_path(sparse_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sparse_root, root)
    bad = []
    for video in (root / "JPEGImages").iterdir():  # the labelled (middle) frame: in every clip
        frames = sorted(video.glob("*.jpg"))
        bad.append(frames[len(frames) // 2])
        bad[-1].write_bytes(b"\xff\xd8 truncated")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # max_failures=2: Train could restart the worker group, but no restart can fix a corrupt frame
    r = subprocess.run([sys.executable, "-m", "svis_ray", "train", "--config", str(ROOT / "configs" / "debug.yaml"),
                        f"data.root={root}", f"output.dir={tmp_path / 'run'}", "train.max_steps=4",
                        "train.milestones=[]", "train.max_failures=2", "train.num_workers=1",
                        "teacher.mode=online", "train.checkpoint_every=4"],
                       capture_output=True, text=True, env=env, timeout=500)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    log = tmp_path / "run" / "ray.log"
    assert last.startswith("svis-ray: error:") and any(str(p) in last for p in bad), last
    assert last.endswith(f"(Ray worker output: {log})")
    # One line, not Ray's worker tracebacks: those are in the log the line names.
    output = (r.stdout + r.stderr).strip().splitlines()
    assert "Traceback" not in r.stdout + r.stderr and len(output) <= 6, output
    worker_output = log.read_text()
    assert "Traceback" in worker_output and "not a decodable image" in worker_output
    assert worker_output.count("Attempting to start training worker group") == 1  # one attempt, no restart


# Needs the shared local Ray, so it lives here, after test_job_submit.py (see that module).
@pytest.mark.timeout(120)
def test_training_stream_carries_the_throttle_in_its_own_context(ray_local, sparse_root, tmp_path):
    import ray

    from svis_ray.config import load_config
    from svis_ray.data.ingest import IdleThrottle, throttled
    from svis_ray.demo_job import DEBUG_CONFIG
    from svis_ray.train import make_dataset_factory

    cfg = load_config(DEBUG_CONFIG, [f"data.root={sparse_root}", f"output.dir={tmp_path / 'run'}"])
    ds = make_dataset_factory(cfg, 1, 3, None, None)()
    assert ds.context.custom_execution_callback_classes.count(IdleThrottle) == 1
    assert throttled(ds).context.custom_execution_callback_classes.count(IdleThrottle) == 1
    # The dataset's context is its own copy: other datasets are not throttled.
    assert IdleThrottle not in ray.data.DataContext.get_current().custom_execution_callback_classes
    assert IdleThrottle not in ray.data.range(3).context.custom_execution_callback_classes
