"""GPU numbers for the faithful model (run by bench/gpu.sh on a machine with a CUDA GPU).

minvis_r50 training images/s at 360x640 (fp32, TF32, AMP fp16), teacher inference frames/s
(eval, no grad), peak GPU memory, and the student/teacher sharing ratio: one student process and
one teacher process on the same GPU, throughput of each relative to running alone.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import torch


def batch(n: int, h: int, w: int, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    from svis_ray.model import preprocess

    images = preprocess(torch.randint(0, 255, (n, 3, h, w), dtype=torch.uint8, generator=g).to(device), [(h, w)] * n)
    targets = [{"labels": torch.randint(0, num_classes, (4,), generator=g).to(device),
                "masks": (torch.rand(4, h, w, generator=g) > 0.8).to(torch.uint8).to(device), "weight": 1.0}
               for _ in range(n)]
    return images, targets


def train_rate(steps: int, n: int, amp: bool, tf32: bool, seconds: float = 0.0) -> tuple[float, float]:
    """(images/s, peak GiB) of minvis_r50 training steps; runs for ``seconds`` if given."""
    from svis_ray.losses import SetCriterion
    from svis_ray.matcher import HungarianMatcher
    from svis_ray.model import build_model
    from svis_ray.optim import build_optimizer, build_scheduler, train_step

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    dev = torch.device("cuda")
    model = build_model("minvis_r50", 40).to(dev).train()
    crit = SetCriterion(40, HungarianMatcher()).to(dev)
    opt = build_optimizer(model)
    sched = build_scheduler(opt, 10**6)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    images, targets = batch(n, 360, 640, 40, dev)
    for _ in range(3):
        train_step(model, crit, opt, sched, images, targets, scaler=scaler, amp=amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - t < seconds:
        train_step(model, crit, opt, sched, images, targets, scaler=scaler, amp=amp)
        done += 1
    torch.cuda.synchronize()
    return n * done / (time.perf_counter() - t), torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def infer_rate(steps: int, n: int, seconds: float = 0.0) -> tuple[float, float]:
    from svis_ray.model import build_model

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    model = build_model("minvis_r50", 40).to(dev).eval()
    images, _ = batch(n, 360, 640, 40, dev)
    for _ in range(3):
        model(images)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - t < seconds:
        model(images)
        done += 1
    torch.cuda.synchronize()
    return n * done / (time.perf_counter() - t), torch.cuda.max_memory_allocated() / 2**30


def _worker(kind: str, seconds: float, q) -> None:
    q.put((kind, train_rate(0, 8, False, True, seconds)[0] if kind == "student" else infer_rate(0, 8, seconds)[0]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--share-seconds", type=float, default=30.0)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    def row(what: str, value: str, mem: str = "") -> None:
        print(f"{what:<44}  {value:>16}  {mem:>9}", flush=True)  # as measured: a timeout keeps the rows

    for name, amp, tf32 in (("fp32", False, False), ("tf32", False, True), ("amp fp16", True, True)):
        ips, mem = train_rate(a.steps, a.batch, amp, tf32)
        row(f"train minvis_r50 360x640 b{a.batch} {name}", f"{ips:.1f} images/s", f"{mem:.1f} GiB")
        torch.cuda.empty_cache()  # the sharing test below needs the memory in other processes
    fps, mem = infer_rate(a.steps, a.batch)
    row(f"teacher inference 360x640 b{a.batch} tf32", f"{fps:.1f} frames/s", f"{mem:.1f} GiB")
    alone = {"student": train_rate(0, 8, False, True, a.share_seconds / 2)[0],
             "teacher": infer_rate(0, 8, a.share_seconds / 2)[0]}
    torch.cuda.empty_cache()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(k, a.share_seconds, q)) for k in ("student", "teacher")]
    for pr in procs:
        pr.start()
    shared = dict(q.get(timeout=10 * a.share_seconds + 120) for _ in procs)
    for pr in procs:
        pr.join()
    for k in ("student", "teacher"):
        row(f"{k} sharing the GPU / alone", f"{shared[k] / alone[k]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
