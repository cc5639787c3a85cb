"""The debug training run on a simulated multi-node cluster (issue 24.8), with faults injected.

``ray.cluster_utils.Cluster`` on this machine: a zero-CPU head, two "student" nodes (1
``student_node`` each) and one "teacher" node (a fake GPU, 1 ``teacher_node``). The run asks for
the role resources (``train.node_resource``, ``teacher.node_resource``); mid-run a teacher actor
and the weight store are killed, then a train worker (a worker-group restart from the last
checkpoint). The test asserts from Ray's state API where every train worker, teacher actor and
decode task ran, that the run finished, that every scheduled clip was trained (replays after the
restart allowed) and that the teacher lag never went negative.

A Cluster cannot share a process with the suite's single-node Ray, so the scenario runs as this
file's ``__main__`` in a subprocess and hands back a JSON summary. Run alone: ``pytest -m cluster``.
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS, WORKERS, CLIPS_PER_STEP = 12, 2, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> dict[str, int]:
    """Fixed ports for a node's agents: with none given, the raylet waits only ~15 s for the agents
    to publish theirs, and on a loaded 2-core box their imports take longer (the node dies with
    "Timed out waiting for file .../metrics_agent_port_...")."""
    return {"metrics_agent_port": _free_port(), "dashboard_agent_listen_port": _free_port(),
            "runtime_env_agent_port": _free_port(), "metrics_export_port": _free_port()}


def _actors(cls_part: str) -> list:
    import ray
    from ray.util.state import list_actors

    return [a for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10000, detail=True)
            if cls_part in a.class_name]


def _wait(cond, what: str, timeout: float, alive: threading.Thread, error: list) -> None:
    deadline = time.time() + timeout
    while not cond():
        if not alive.is_alive():
            raise AssertionError(f"the run ended before {what}: {error}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def scenario(data_root: str, work: str) -> dict:
    """Runs in the subprocess: start the cluster, train with faults, return what the test checks."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import UserCallback
    from ray.util.state import list_tasks

    from svis_ray.config import load_config
    from svis_ray.train import run_training

    store_mb = 150 * 1024**2
    head_args = {"num_cpus": 0, "include_dashboard": True, "dashboard_port": _free_port(),
                 "gcs_server_port": _free_port(), "object_store_memory": store_mb, **_agent_ports()}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    students = [cluster.add_node(num_cpus=3, resources={"student_node": 1}, object_store_memory=store_mb,
                                 **_agent_ports()) for _ in range(2)]
    teacher = cluster.add_node(num_cpus=2, num_gpus=1, resources={"teacher_node": 1}, object_store_memory=store_mb,
                               **_agent_ports())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = Path(work) / "run"
    clips_file = Path(work) / "clips.jsonl"

    class ClipRecorder(UserCallback):  # every rank's trained clip indices, from its reports
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(clips_file, "a") as f:
                for m in metrics:
                    f.write(json.dumps(m.get("clip_index", [])) + "\n")

    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        f"data.root={data_root}", f"output.dir={out}", "data.val_json=''", f"train.max_steps={MAX_STEPS}",
        "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0", f"train.num_workers={WORKERS}",
        "train.max_failures=3", "train.milestones=[]", f"data.clips_per_step={CLIPS_PER_STEP}",
        "loss.num_points=1024", "teacher.num_teachers=1", "teacher.gpus_per_teacher=1",
        "teacher.publish_every=2", "teacher.warmup_steps=0",
        "pseudo.ramp_steps=0", "pseudo.refine=none",
        "teacher.max_buffer_mb=1",  # teachers stay a few clips ahead: they still run when the faults come
        "train.node_resource=student_node", "teacher.node_resource=teacher_node", "output.progress_bar=false"])
    error: list = []

    def train() -> None:
        try:
            run_training(cfg, callbacks=[ClipRecorder()])
        except BaseException as e:  # reported below
            error.append(repr(e))

    th = threading.Thread(target=train)
    th.start()
    metrics_csv = out / "metrics.csv"
    progress = out / "progress.json"
    faults = {}
    # 1. a teacher actor and the weight store die once training runs
    # (as soon as a teacher is up: the student consumes its clips, so waiting for a logged step as
    # well could find the pool already done with the 24 clips of the schedule on a fast box)
    def teaching() -> list:
        return [a for a in _actors("Teacher") if a.state == "ALIVE"]

    _wait(teaching, "a teacher at work", 240, th, error)
    victim = teaching()[0]
    os.kill(victim.pid, signal.SIGKILL)
    store = next(a for a in _actors("WeightStore") if a.state == "ALIVE")
    ray.kill(ray.get_actor(store.name, namespace=store.ray_namespace), no_restart=False)
    faults["killed_at_step"] = int(_rows(metrics_csv)[-1]["step"]) if _rows(metrics_csv) else 0
    # 2. a train worker dies after a checkpoint taken since (worker-group restart from it)
    _wait(lambda: progress.exists() and json.loads(progress.read_text())["step"] > faults["killed_at_step"],
          "a checkpoint after the teacher/store kill", 240, th, error)
    worker = next(a for a in _actors("RayTrainWorker") if a.state == "ALIVE")
    os.kill(worker.pid, signal.SIGKILL)
    faults["worker_killed_at_step"] = int(_rows(metrics_csv)[-1]["step"])
    th.join(400)

    gcs = ray.get_runtime_context().gcs_address
    tasks = list_tasks(address=gcs, limit=10000, detail=True)
    placement = {
        "train_workers": [a.node_id for a in _actors("RayTrainWorker")],
        "teachers": [a.node_id for a in _actors("Teacher")],
        "decode_tasks": sorted({t.node_id for t in tasks if "decode_clip" in t.name and t.node_id}),
        "task_names": sorted({t.name for t in tasks}),
        "store_restarts": max(a.num_restarts for a in _actors("WeightStore")),
    }
    summary = {
        "error": error, "alive": th.is_alive(), "faults": faults, "placement": placement,
        "nodes": {"head": cluster.head_node.node_id, "students": [n.node_id for n in students],
                  "teacher": teacher.node_id},
        "rows": _rows(metrics_csv), "best": (out / "best.pt").exists(),
        "clips": [c for line in clips_file.read_text().splitlines() for c in json.loads(line)]
        if clips_file.exists() else [],
    }
    ray.shutdown()
    cluster.shutdown()
    return summary


@pytest.mark.timeout(600)
def test_roles_and_faults_on_a_simulated_cluster(demo_root, tmp_path):
    from svis_ray.data.sparsify import sparsify

    if not (demo_root / "train_1frame.json").exists():
        sparsify(str(demo_root / "train.json"), str(demo_root / "train_1frame.json"), frames_per_video=1,
                 strategy="middle", seed=0)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_RAYLET_START_WAIT_TIME_S": "120",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, __file__, str(demo_root), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=560, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert not s["error"] and not s["alive"], s["error"]
    nodes, where = s["nodes"], s["placement"]
    # placement: train workers on both student nodes (one role slot each), teachers on the teacher
    # node, decode tasks never on the zero-CPU head
    assert set(where["train_workers"]) == set(nodes["students"])
    assert len(where["train_workers"]) >= 2 * WORKERS  # the first group and the restarted one
    assert where["teachers"] and set(where["teachers"]) == {nodes["teacher"]}
    assert where["decode_tasks"] and nodes["head"] not in where["decode_tasks"], where["task_names"]
    assert where["store_restarts"] >= 1
    # the run finished every step, and every scheduled clip was trained (replays allowed)
    steps = [int(r["step"]) for r in s["rows"]]
    assert s["best"] and steps[-1] == MAX_STEPS and set(steps) == set(range(1, MAX_STEPS + 1))
    assert steps.count(1) == 1  # resumed from a checkpoint, never started over
    assert set(s["clips"]) == set(range(MAX_STEPS * WORKERS * CLIPS_PER_STEP))
    assert len(s["clips"]) >= MAX_STEPS * WORKERS * CLIPS_PER_STEP
    # teachers never labelled with weights ahead of the student (the lost trajectory's)
    assert all(float(r["teacher_lag"]) >= 0 for r in s["rows"])


if __name__ == "__main__":
    result = scenario(sys.argv[1], sys.argv[2])
    Path(sys.argv[2], "summary.json").write_text(json.dumps(result))
