"""Ray Data decode-and-resize throughput against a plain OpenCV loop on the same cores.

    python bench/ingest.py [--frames 4000] [--size 360x640] [--cores N]

Both sides decode the same JPEG frames and resize them to the training short side with the
project's own functions; the plain side is a ``multiprocessing.Pool`` of N processes, the Ray side
``map_batches`` over a task pool of N tasks (Ray started with N CPUs, warmed up first). Each side
runs twice, alternating, and the better time counts (these machines are noisy). Prints the ratio
(Ray frames/s / plain frames/s) and exits 1 when it is below the goal (0.9).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from svis_ray.data.demo import make_demo_data
from svis_ray.data.ingest import read_bytes
from svis_ray.data.transforms import resize_image, resized_shape
from svis_ray.data.ytvis import decode_frame

GOAL = 0.9
SHORT, MAX_SIZE = 360, 1333


def load(path: str) -> int:
    img = decode_frame(read_bytes(path), source=path)
    out = resize_image(img, resized_shape(img.shape[0], img.shape[1], SHORT, MAX_SIZE))
    return int(out.shape[0])


def load_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"h": np.asarray([load(str(p)) for p in batch["path"]])}


def plain(paths: list[str], cores: int) -> float:
    t = time.perf_counter()
    with Pool(cores) as pool:
        done = sum(1 for _ in pool.imap_unordered(load, paths, chunksize=8))
    assert done == len(paths)
    return time.perf_counter() - t


def with_ray(paths: list[str], cores: int) -> float:
    import ray

    t = time.perf_counter()
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=cores * 4)
    ds = ds.map_batches(load_batch, batch_size=8, compute=ray.data.TaskPoolStrategy(size=cores), num_cpus=1)
    done = sum(len(b["h"]) for b in ds.iter_batches(batch_size=64))
    assert done == len(paths)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=4000)
    p.add_argument("--size", default="360x640")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    import ray

    with tempfile.TemporaryDirectory() as d:
        videos = max(2, a.frames // 20)
        make_demo_data(d, videos=videos - 1, val_videos=1, frames=20, size=(h, w), seed=0)
        paths = sorted(str(p) for p in Path(d, "JPEGImages").rglob("*.jpg"))[: a.frames]
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=a.cores, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 1024**2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with_ray(paths[: 4 * a.cores], a.cores)  # warm up worker processes
        t_plain, t_ray = [], []
        for _ in range(2):
            t_plain.append(plain(paths, a.cores))
            t_ray.append(with_ray(paths, a.cores))
        ray.shutdown()
    fps_plain, fps_ray = len(paths) / min(t_plain), len(paths) / min(t_ray)
    ratio = fps_ray / fps_plain
    print(f"frames {len(paths)} of {h}x{w}, {a.cores} cores: plain OpenCV {fps_plain:.1f} frames/s, "
          f"Ray Data {fps_ray:.1f} frames/s")
    print(f"ratio ray/plain = {ratio:.3f} (goal >= {GOAL}) -> {'PASS' if ratio >= GOAL else 'FAIL'}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
