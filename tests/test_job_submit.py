"""`ray start --head` on loopback, then `ray job submit` of jobs/train.py.

Kept in its own module, which sorts before test_pipeline.py: it must run before the session's
shared local Ray (the `ray_local` fixture) exists — with that instance alive in the pytest
process the new head's job agent never became available ("No available agent to submit job").
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svis_ray.data.sparsify import sparsify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sparse_root(demo_root):
    sparsify(str(demo_root / "train.json"), str(demo_root / "train_1frame.json"), frames_per_video=1,
             strategy="middle", seed=0)
    return demo_root


@pytest.mark.timeout(600)
def test_ray_job_submit(sparse_root, tmp_path):
    """`ray start --head` on loopback, `ray job submit` of jobs/train.py, SUCCEEDED + outputs."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"svis_job_{os.getpid()}"
    subprocess.run([str(ray_bin), "start", "--head", "--port=6391",
                    "--dashboard-port=8291", "--ray-client-server-port=20291", "--num-cpus=8",
                    # the agents' ports too: the test session's own Ray holds the defaults (52365, ...)
                    "--dashboard-agent-listen-port=52391", "--dashboard-agent-grpc-port=52392",
                    "--runtime-env-agent-port=52393", "--metrics-export-port=52394",
                    f"--temp-dir={temp}", "--disable-usage-stats", "--object-store-memory=300000000"],
                   check=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    # Not inherited from pytest: the daemons `ray start` leaves behind keep these descriptors, and
    # under pytest's capture the dashboard agent never came up ("No available agent to submit job").
    try:
        out = tmp_path / "job_run"
        for _ in range(12):  # the head's job agent needs a few seconds after `ray start`
            r = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps({"excludes": [".venv", "demo", "runs", ".git"]}), "--",
                 sys.executable, "jobs/train.py", "--config", "configs/debug.yaml", f"data.root={sparse_root}",
                 f"output.dir={out}", "train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=2",
                 "train.num_workers=1", "teacher.num_teachers=1", "data.clips_per_step=1",
                 "loss.num_points=1024", "train.milestones=[]"],
                env=env, capture_output=True, text=True, timeout=500)
            if "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(10)
        assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr).lower(), r.stdout[-3000:] + r.stderr[-3000:]
        assert (out / "best.pt").exists() and (out / "metrics.json").exists()
    finally:
        # Stop only this head (by its temp dir), never `ray stop` (it kills every Ray on the host).
        for line in subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
