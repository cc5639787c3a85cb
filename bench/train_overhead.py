"""Student steps/s through a 1-worker ``TorchTrainer`` against a bare PyTorch loop.

    python bench/train_overhead.py [--steps 30] [--preset tiny] [--size 96x128] [--frames 6]

Same model, batch and in-memory data, same torch thread count on both sides, the project's own
``train_step``. The TorchTrainer side includes what a user pays for Ray Train inside the loop
(worker process, ``prepare_model``, a metrics ``ray.train.report`` every 10 steps) but not
worker-group start-up, which is paid once per run; both sides skip 3 warm-up steps. Runs
bare / Ray / bare / Ray and keeps each side's best. Prints the ratio and exits 1 below 0.95.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

GOAL = 0.95


def make_batch(num_classes: int, frames: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    from svis_ray.model import preprocess

    images = preprocess(torch.randint(0, 255, (frames, 3, h, w), dtype=torch.uint8, generator=g), [(h, w)] * frames)
    targets = []
    for _ in range(frames):
        masks = (torch.rand(3, h, w, generator=g) > 0.7).to(torch.uint8)
        targets.append({"labels": torch.randint(0, num_classes, (3,), generator=g), "masks": masks, "weight": 1.0})
    return images, targets


def timed_steps(cfg: dict, report=None) -> float:
    """Seconds for ``cfg['steps']`` training steps after 3 warm-up steps."""
    from svis_ray.losses import SetCriterion
    from svis_ray.matcher import HungarianMatcher
    from svis_ray.model import build_model
    from svis_ray.optim import build_optimizer, build_scheduler, train_step

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = build_model(cfg["preset"], 5)
    if report is not None:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=torch.device("cpu"))
    criterion = SetCriterion(5, HungarianMatcher(num_points=3136), num_points=3136)
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, cfg["steps"] + 3)
    images, targets = make_batch(5, cfg["frames"], cfg["h"], cfg["w"])
    for i in range(cfg["steps"] + 3):
        if i == 3:
            t = time.perf_counter()
        train_step(model, criterion, optimizer, scheduler, images, targets)
        if report is not None and (i + 1) % 10 == 0:
            report({"step": i + 1})
    return time.perf_counter() - t


def ray_loop(cfg: dict) -> None:
    import ray.train

    seconds = timed_steps(cfg, report=ray.train.report)
    with open(cfg["out"], "w") as f:
        f.write(str(seconds))


def with_trainer(cfg: dict) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as d:
        cfg = {**cfg, "out": os.path.join(d, "seconds")}
        TorchTrainer(ray_loop, train_loop_config=cfg,
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg["threads"]}),
                     run_config=RunConfig(storage_path=d, name="bench")).fit()
        with open(cfg["out"]) as f:
            return float(f.read())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", default="96x128")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    cfg = {"steps": a.steps, "preset": a.preset, "h": h, "w": w, "frames": a.frames, "threads": a.threads}
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(2, a.threads), log_to_driver=False, object_store_memory=300 * 1024**2)
    bare, trained = [], []
    for _ in range(2):
        bare.append(timed_steps(cfg))
        trained.append(with_trainer(cfg))
    ray.shutdown()
    sps_bare, sps_ray = a.steps / min(bare), a.steps / min(trained)
    ratio = sps_ray / sps_bare
    print(f"{a.preset} {a.frames}x{h}x{w}, {a.threads} threads: bare {sps_bare:.2f} steps/s, "
          f"TorchTrainer {sps_ray:.2f} steps/s")
    print(f"ratio trainer/bare = {ratio:.3f} (goal >= {GOAL}) -> {'PASS' if ratio >= GOAL else 'FAIL'}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
