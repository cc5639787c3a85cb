"""Peak memory of the driver and the Train controller, and time to the first training block, as
the training split grows from 10k to 100k videos (issue 24, item 7).

    python bench/scale.py [--sizes 10000 100000] [--steps 6000]

Writes YouTube-VIS annotation files of each size to a temp folder (no frames: ~30 frames a
video, ~1.7 instances a video, every frame of an instance annotated -- a full split such as
train.json, the large case -- with small compressed-RLE or polygon masks at 720x1280). For each
size a child process runs the training driver's path: a local Ray (``ray_init``), the training
split shared once (``training_split``: one-shot parse task, index in the object store), the
run's dataset factory (streamed clip schedule -> decode) and a ``TorchTrainer`` with one worker
that takes one training batch (``data.clips_per_step`` clips) and returns. The frames do not
exist, so each clip decodes to zero frames under ``data.on_bad_frame=skip``: the schedule, the
Data tasks and the controller run as in training, without the JPEG decoding.

Memory is each process's peak resident set (``VmHWM`` from /proc, read every 0.2 s while it
lives; the driver's own ``ru_maxrss`` at the end); the controller is the process whose title
names ``TrainController``. Prints the figures side by side with the ratios and exits 1 unless
the driver + controller peak grows at most 1.5x for 10x the videos and stays under 4 GiB at
the largest size. The one-shot parse task's peak and the index size are printed too: they are
not held by the driver or the controller (the task's process exits when it is done).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RATIO_GOAL, PEAK_GOAL = 1.5, 4 * 1024**3
GROUPS = {"controller": "TrainController", "parse task": "build_index"}
H, W = 720, 1280


# ----------------------------------------------------------------------------- the annotation files
def _templates(rng: np.random.Generator, n: int = 64) -> tuple[list[str], list[list[list[float]]]]:
    """Small masks: compressed RLE strings of thin boxes, and triangles as polygons."""
    from pycocotools import mask as mask_utils

    rles, polys = [], []
    for _ in range(n):
        m = np.zeros((H, W), np.uint8, order="F")
        y, x = int(rng.integers(0, H - 80)), int(rng.integers(0, W - 16))
        m[y:y + int(rng.integers(20, 80)), x:x + int(rng.integers(4, 16))] = 1
        rles.append(mask_utils.encode(m)["counts"].decode("ascii"))
        polys.append([[float(x), float(y), float(x + 40), float(y), float(x + 20), float(y + 30)]])
    return rles, polys


def write_split(path: Path, videos: int, seed: int = 0) -> dict[str, int]:
    """A YTVIS train file of ``videos`` videos, written element by element (never whole in memory)."""
    rng = np.random.default_rng(seed)
    rles, polys = _templates(rng)
    lengths = rng.integers(20, 41, videos)  # 30 frames on average
    anns = 0
    with open(path, "w") as f:
        f.write('{"categories": ' + json.dumps([{"id": c + 1, "name": f"class{c}"} for c in range(40)]))
        f.write(', "videos": [')
        for i, n in enumerate(lengths.tolist()):
            name = f"{rng.integers(1 << 40):010x}"
            f.write((", " if i else "") + json.dumps({
                "id": i + 1, "width": W, "height": H, "length": n,
                "file_names": [f"{name}/{t * 5:05d}.jpg" for t in range(n)]}))
        f.write('], "annotations": [')
        for i, n in enumerate(lengths.tolist()):
            for _ in range(int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))):  # 1.7 instances a video
                present = rng.random(n) < 0.9
                rle = rng.random() < 0.7
                k = int(rng.integers(len(rles)))
                seg = {"size": [H, W], "counts": rles[k]} if rle else polys[k]
                f.write((", " if anns else "") + json.dumps({
                    "id": anns + 1, "video_id": i + 1, "category_id": int(rng.integers(1, 41)), "iscrowd": 0,
                    "segmentations": [seg if p else None for p in present],
                    "areas": [900.0 if p else None for p in present],
                    "bboxes": [[10.0, 20.0, 12.0, 60.0] if p else None for p in present]}))
                anns += 1
        f.write("]}")
    return {"videos": videos, "frames": int(lengths.sum()), "annotations": anns, "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------- the child: driver path
def first_block_loop(config: dict) -> None:
    """The bench's train function: the first training batch, its arrival time, nothing else."""
    import ray.train

    batches = ray.train.get_dataset_shard("train").iter_batches(batch_size=config["clips_per_step"])
    batch = next(iter(batches))
    Path(config["marker"]).write_text(json.dumps({"time": time.time(), "clips": len(batch["clip_index"])}))


def child(ann: str, out: str, steps: int) -> None:
    start = time.time()
    import ray.train
    from ray.train import RunConfig, ScalingConfig

    from svis_ray.config import absolute_paths, load_config
    from svis_ray.train import (SvisTorchTrainer, ingest_options, make_dataset_factory, ray_init, training_split,
                                worker_resources)

    ray_init()
    ready = time.time()
    cfg = absolute_paths(load_config(ROOT / "configs" / "debug.yaml", [
        f"data.root={Path(ann).parent}", f"data.train_json={Path(ann).name}", "data.val_json=''",
        f"output.dir={out}/run", f"train.max_steps={steps}", "train.milestones=[]", "train.num_workers=1",
        "data.clips_per_step=4", "teacher.mode=online", "data.on_bad_frame=skip"]))
    split = training_split(cfg)  # as run_training: parsed once, shared by reference
    shared = time.time()
    marker = Path(out) / "first_block.json"
    trainer = SvisTorchTrainer(
        first_block_loop, train_loop_config={"marker": str(marker), "clips_per_step": cfg.data.clips_per_step},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name="scale", storage_path=out),
        datasets={"train": make_dataset_factory(cfg, 1, len(split.class_names), None, None, split)},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(cfg)))
    trainer.fit()
    first = json.loads(marker.read_text())
    (Path(out) / "result.json").write_text(json.dumps({  # not stdout: Ray's worker output goes there
        "ray_init_s": ready - start, "share_s": shared - ready, "first_block_s": first["time"] - ready,
        "clips": first["clips"], "index_bytes": split.nbytes,
        "driver_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


# ----------------------------------------------------------------------------- the parent: sampling
def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peak RSS (VmHWM) of the driver and of each process group below it, every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.hwm: dict[int, int] = {}
        self.group: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    if p.pid not in self.group or self.group[p.pid] == "":
                        title = " ".join(p.cmdline())
                        self.group[p.pid] = "driver" if p.pid == self.root.pid else next(
                            (g for g, key in GROUPS.items() if key in title), "")
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), _hwm(p.pid))
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    pass

    def peak(self, group: str) -> int:
        return max([self.hwm[p] for p, g in self.group.items() if g == group] or [0])


def measure(ann: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="svis-scale-run-") as out:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               # room for the index next to the stream (it is not in the driver's or controller's RSS)
               "SVIS_OBJECT_STORE_BYTES": str(2 * 1024**3)}
        env.pop("RAY_ADDRESS", None)
        with open(Path(out) / "child.log", "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(ann), "--out", out, "--steps",
                                     str(steps)], stdout=log, stderr=subprocess.STDOUT, env=env)
            sampler = Sampler(proc.pid)
            sampler.start()
            proc.wait()
            sampler.stop.set()
            sampler.join()
        if proc.returncode or not (Path(out) / "result.json").exists():
            sys.exit(f"child for {ann} failed ({proc.returncode}):\n" + (Path(out) / "child.log").read_text()[-4000:])
        got = json.loads((Path(out) / "result.json").read_text())
    driver = max(got["driver_maxrss"], sampler.peak("driver"))
    return {**got, "driver": driver, "controller": sampler.peak("controller"), "parse": sampler.peak("parse task"),
            "head": driver + sampler.peak("controller")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--steps", type=int, default=6000, help="train.max_steps (4 clips a step, one worker)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.out, a.steps)
        return 0
    mib = 1024**2
    rows = {}
    with tempfile.TemporaryDirectory(prefix="svis-scale-") as d:
        for n in a.sizes:
            t = time.time()
            info = write_split(Path(d) / f"train_{n}.json", n)
            print(f"{n} videos: {info['frames']} frames, {info['annotations']} annotations, "
                  f"{info['bytes'] / mib:.0f} MiB of JSON (written in {time.time() - t:.0f} s)", flush=True)
            rows[n] = {**info, **measure(Path(d) / f"train_{n}.json", a.steps)}
            (Path(d) / f"train_{n}.json").unlink()
    lo, hi = rows[a.sizes[0]], rows[a.sizes[-1]]
    lines = [("videos", "{:>12,}", lambda r: r["videos"]),
             ("annotation JSON (MiB)", "{:>12.0f}", lambda r: r["bytes"] / mib),
             ("driver peak RSS (MiB)", "{:>12.0f}", lambda r: r["driver"] / mib),
             ("controller peak RSS (MiB)", "{:>12.0f}", lambda r: r["controller"] / mib),
             ("driver + controller (MiB)", "{:>12.0f}", lambda r: r["head"] / mib),
             ("parse task peak RSS (MiB)", "{:>12.0f}", lambda r: r["parse"] / mib),
             ("split index (MiB, object store)", "{:>12.0f}", lambda r: r["index_bytes"] / mib),
             ("ray_init (s)", "{:>12.1f}", lambda r: r["ray_init_s"]),
             ("parse + index, share_split (s)", "{:>12.1f}", lambda r: r["share_s"]),
             ("first training block (s)", "{:>12.1f}", lambda r: r["first_block_s"])]
    print(f"\nclip schedule: {a.steps} steps x 4 clips; first block = one batch at the train worker, "
          f"seconds after ray_init\n")
    print(f"{'':34}" + "".join(f"{n:>12,}" for n in a.sizes))
    for name, fmt, get in lines[1:]:
        print(f"{name:34}" + "".join(fmt.format(get(rows[n])) for n in a.sizes))
    ratio = hi["head"] / lo["head"]
    ok_ratio, ok_peak = ratio <= RATIO_GOAL, hi["head"] < PEAK_GOAL
    print(f"\ndriver + controller peak, {hi['videos']:,} / {lo['videos']:,} videos: {ratio:.2f}x "
          f"(goal <= {RATIO_GOAL}x): {'met' if ok_ratio else 'MISSED'}")
    print(f"driver + controller peak at {hi['videos']:,} videos: {hi['head'] / 1024**3:.2f} GiB "
          f"(goal < 4 GiB): {'met' if ok_peak else 'MISSED'}")
    return 0 if ok_ratio and ok_peak else 1


if __name__ == "__main__":
    sys.exit(main())
