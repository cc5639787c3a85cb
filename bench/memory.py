"""Peak resident memory of the debug training run and of the teacher actors, as the dataset grows.

    python bench/memory.py [--videos 24] [--steps 40]

Trains the same number of steps on N and on 4N demo videos and samples, twice a second, the
resident memory of the train workers and of the teacher actors (psutil, by Ray process title).
Streaming means the peak must not grow with the dataset: prints peak(4N)/peak(N) for both and
exits 1 unless both are < 1.3.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading

import psutil

GOAL = 1.3
GROUPS = {"train workers": "RayTrainWorker", "teacher actors": "Teacher"}


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {g: 0 for g in GROUPS}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            total = {g: 0 for g in GROUPS}
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(proc.info["cmdline"] or [])
                for g, key in GROUPS.items():
                    if title.startswith("ray::") and key in title and proc.info["memory_info"]:
                        total[g] += proc.info["memory_info"].rss
            for g in GROUPS:
                self.peak[g] = max(self.peak[g], total[g])


def peak_for(videos: int, steps: int) -> dict[str, int]:
    from svis_ray.config import load_config
    from svis_ray.data.demo import make_demo_data
    from svis_ray.data.sparsify import sparsify
    from svis_ray.demo_job import DEBUG_CONFIG
    from svis_ray.train import run_training

    with tempfile.TemporaryDirectory() as d:
        make_demo_data(d, videos=videos, val_videos=2, seed=0)
        sparsify(f"{d}/train.json", f"{d}/train_1frame.json", strategy="middle")
        cfg = load_config(DEBUG_CONFIG, [f"data.root={d}", f"output.dir={d}/run", f"train.max_steps={steps}",
                                         "train.milestones=[]", "train.eval_every=0", f"train.checkpoint_every={steps}"])
        sampler = Sampler()
        sampler.start()
        run_training(cfg)
        sampler.stop.set()
        sampler.join()
    return sampler.peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from svis_ray.train import ray_init

    ray_init()
    small, large = peak_for(a.videos, a.steps), peak_for(4 * a.videos, a.steps)
    ok = True
    for g in GROUPS:
        ratio = large[g] / max(1, small[g])
        ok &= ratio < GOAL
        print(f"{g}: peak RSS {small[g] / 2**20:.0f} MiB ({a.videos} videos) -> {large[g] / 2**20:.0f} MiB "
              f"({4 * a.videos} videos), ratio {ratio:.2f} (goal < {GOAL})")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
