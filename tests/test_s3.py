"""Object storage: svis_ray.io against a real S3 API (moto's server on 127.0.0.1), and a training
run whose data and run folder live only in a bucket (issue 24: no shared disk on a cluster).

Run alone with ``python -m pytest -m s3``. The server is in this process; the training run is a
``svis-ray train`` subprocess in an empty working folder, with the standard AWS environment
pointing at the server (as a cluster node would have it).
"""
import csv
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest

from svis_ray import io
from svis_ray.errors import SvisError

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "svis-test"

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; the AWS environment points at it for the module."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pyarrow.fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                            allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def s3_data(s3, demo_root):
    """The session demo data plus its one-labelled-frame split, uploaded by tools/s3_copy.py."""
    from svis_ray.data.sparsify import sparsify

    if not (demo_root / "train_1frame.json").exists():
        sparsify(str(demo_root / "train.json"), str(demo_root / "train_1frame.json"), frames_per_video=1,
                 strategy="middle", seed=0)
    uri = f"s3://{BUCKET}/data"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "s3_copy.py"), str(demo_root), uri],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return uri


def listing(uri):
    import pyarrow.fs

    fs, path = io.filesystem(uri)
    return {i.path[len(path) + 1:] for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
            if i.type == pyarrow.fs.FileType.File}


# ----------------------------------------------------------------------------- io unit tests
def test_round_trips_and_one_filesystem_per_bucket(s3, tmp_path):
    base = f"s3://{BUCKET}/unit"
    io.write_json(io.join(base, "a", "x.json"), {"k": [1, 2]})
    assert io.read_json(f"{base}/a/x.json") == {"k": [1, 2]}
    assert io.exists(f"{base}/a") and io.is_file(f"{base}/a/x.json") and not io.exists(f"{base}/nothing")
    io.write_bytes(f"{base}/b.bin", b"\x00\x01")
    io.copy_file(f"{base}/b.bin", tmp_path / "b.bin")
    io.copy_file(tmp_path / "b.bin", f"{base}/c.bin")
    assert io.read_bytes(f"{base}/c.bin") == b"\x00\x01"
    with io.open_output_stream(f"{base}/d.txt") as f:
        f.write(b"done")
    with pytest.raises(RuntimeError):
        with io.open_output_stream(f"{base}/e.txt") as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    assert io.read_bytes(f"{base}/d.txt") == b"done" and not io.exists(f"{base}/e.txt")  # nothing partial
    assert (io.parent(f"{base}/a/x.json"), io.basename(f"{base}/a/x.json")) == (f"{base}/a", "x.json")
    fs, path = io.filesystem(f"s3://{BUCKET}/some/key")
    assert path == f"{BUCKET}/some/key" and io.filesystem(f"s3://{BUCKET}/other")[0] is fs
    local_fs, local_path = io.filesystem(tmp_path / "b.bin")
    assert local_fs.type_name == "local" and local_path == str(tmp_path / "b.bin")


def test_appender_rewrites_the_object_and_resumes_from_it(s3):
    uri = f"s3://{BUCKET}/unit/metrics.csv"
    log = io.Appender(uri)
    log.append("step\n")
    log.append("1\n")
    again = io.Appender(uri)  # a restarted process
    assert again.existing() == "step\n1\n"
    again.append("2\n")
    assert io.read_bytes(uri) == b"step\n1\n2\n"


def test_missing_key_bucket_and_unreachable_endpoint_are_one_line_errors(s3, monkeypatch):
    with pytest.raises(SvisError, match=rf"^s3://{BUCKET}/nope.json: JSON file not found$"):
        io.read_json(f"s3://{BUCKET}/nope.json")
    with pytest.raises(SvisError, match=r"^s3://no-such-bucket/k: cannot write file: .*bucket does not exist"):
        io.write_bytes("s3://no-such-bucket/k", b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(SvisError) as e:
        io.read_bytes(f"s3://{BUCKET}/unit/b.bin")
    assert str(e.value).startswith(f"s3://{BUCKET}/unit/b.bin: cannot read file: ") and "\n" not in str(e.value)


def test_frames_annotations_and_checkpoints_from_the_bucket(s3, s3_data, demo_root, tmp_path):
    from svis_ray.data.ingest import DecodeConfig, clip_rows, decode_clip, load_split
    from svis_ray.model import build_model, load_checkpoint, save_checkpoint

    train = load_split(s3_data, "train_1frame.json")
    assert len(train.videos) == len(load_split(str(demo_root), "train_1frame.json").videos)
    before = io._filesystem.cache_info().currsize
    rows = clip_rows(train, s3_data, 4, 2, seed=0)
    clips = [decode_clip(r, DecodeConfig((96,), 256, False, "fail", 0)) for r in rows]
    assert all(c["image"].shape[0] == 2 for c in clips)
    assert io._filesystem.cache_info().currsize == before  # the bucket's filesystem, not one per frame
    uri = f"s3://{BUCKET}/unit/model.pt"
    save_checkpoint(uri, build_model("tiny", len(train.class_names)), train.class_names)
    model, info = load_checkpoint(uri)
    assert info["class_names"] == train.class_names
    with pytest.raises(SvisError, match=rf"^s3://{BUCKET}/unit/none.pt: checkpoint not found$"):
        load_checkpoint(f"s3://{BUCKET}/unit/none.pt")


def test_predict_reads_a_checkpoint_uri_and_writes_its_outputs_to_the_bucket(s3, demo_root, tmp_path):
    import shutil

    from svis_ray.data.ytvis import YTVIS
    from svis_ray.model import build_model, save_checkpoint
    from svis_ray.predict import predict

    split = YTVIS.load(demo_root / "val.json")
    ckpt = f"s3://{BUCKET}/predict/model.pt"
    save_checkpoint(ckpt, build_model("tiny", len(split.class_names)), split.class_names)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, name in enumerate(split.videos[0]["file_names"][:4]):
        shutil.copy(demo_root / "JPEGImages" / name, folder / f"f{t}.jpg")
    out = f"s3://{BUCKET}/predict/out"
    s = predict(ckpt, folder, out, zip_results=True, min_size=96, max_size=128, log=lambda _: None)
    assert set(s["outputs"]) == {f"{out}/results.json", f"{out}/frames.tracks.json", f"{out}/submission.zip"}
    assert listing(out) == {"results.json", "frames.tracks.json", "submission.zip"}
    assert io.read_json(f"{out}/frames.tracks.json")["frames"] == 4


def test_sweep_folder_and_trial_run_folders_as_uris(tmp_path):
    from svis_ray.tuning import best_config, load_sweep

    sweep = load_sweep(ROOT / "configs" / "tune_debug.yaml", [f"storage_path=s3://{BUCKET}/tune", "name=s"])
    assert sweep.dir == f"s3://{BUCKET}/tune/s"
    assert best_config(sweep, {}).output.dir == f"s3://{BUCKET}/tune/s/best_run"


# ----------------------------------------------------------------------------- training
def train(s3, data, out, cwd, *extra):
    """``svis-ray train`` in ``cwd`` with the smallest debug settings that still evaluate, keep a
    Parquet pseudo-label store and checkpoint; returns its console output. The frozen backbone
    (freeze_at 5) keeps the optimizer state, and so each checkpoint upload, 90 MB smaller."""
    env = {**os.environ, **s3, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "SVIS_OBJECT_STORE_BYTES": str(300 * 1024**2)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "svis_ray", "train", "--config", str(ROOT / "configs" / "debug.yaml"),
           f"data.root={data}", f"output.dir={out}", "train.max_steps=2", "train.checkpoint_every=2",
           "train.eval_every=0", "train.log_every=1", "train.num_workers=1", "teacher.num_teachers=1",
           "teacher.warmup_steps=0", "teacher.publish_every=1", "pseudo.ramp_steps=0", "data.clips_per_step=1",
           "train.milestones=[]", "loss.num_points=1024", "pseudo.store=parquet", "pseudo.refine=none",
           "output.progress_bar=false", "model.overrides={freeze_at: 5}", *extra]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(600)
def test_training_with_data_and_run_folder_in_the_bucket_then_resume(s3, s3_data, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = f"s3://{BUCKET}/runs/debug"
    first = train(s3, s3_data, out, cwd)
    assert "resuming" not in first
    files = listing(out)
    for name in ("best.pt", "results.json", "metrics.json", "metrics.csv", "config.yaml", "progress.json",
                 "checkpoint_manager_snapshot.json"):
        assert name in files, (name, sorted(files))
    assert any(f.startswith("tb/events.out.tfevents.") for f in files)
    assert any(f.startswith("pseudo_labels/part-") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("checkpoint_") and f.endswith("/model.pt") for f in files)
    assert io.read_json(f"{out}/progress.json") == {"step": 2}
    assert list(cwd.iterdir()) == []  # nothing written where the command ran

    second = train(s3, s3_data, out, cwd, "train.max_steps=3")
    assert f"resuming from step 2 of 3 ({out})" in second.splitlines()
    rows = csv.DictReader(StringIO(io.read_bytes(f"{out}/metrics.csv").decode()))
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3]  # one header; step 3 after the resume
    assert io.read_json(f"{out}/progress.json") == {"step": 3}
    assert list(cwd.iterdir()) == []
