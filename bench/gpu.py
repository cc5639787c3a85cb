"""GPU numbers for the faithful model in one run (bench/gpu.sh; issue 26).

Side by side: minvis_r50 training images/s and peak memory at 360x640 for fp32 / tf32 / bf16 x
eager / torch.compile, the model FLOPs per image (torch.utils.flop_counter: matmuls and
convolutions, forward + backward) and the fraction of the GPU's peak they reach, the step's time
split (data, forward, matcher, losses, backward, optimizer), host syncs per step, teacher
frames/s (eager vs compiled, bf16), and the student/teacher sharing ratio on one GPU.
Rows print as they are measured; a row that would start after ``--budget`` seconds is skipped,
so the run fits a 10-minute device slot including compilation.

``--cpu-smoke``: the same rows for the tiny preset at 64x96 on the CPU, in about a minute (checks
the script; the numbers say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np
import torch

# Dense peak TFLOP/s (no sparsity) per precision, from the vendors' data sheets; first match wins.
PEAKS = [("H100 PCIe", {"fp32": 51, "tf32": 378, "bf16": 756}),
         ("H100", {"fp32": 67, "tf32": 495, "bf16": 989}), ("H200", {"fp32": 67, "tf32": 495, "bf16": 989}),
         ("A100", {"fp32": 19.5, "tf32": 156, "bf16": 312}), ("L40S", {"fp32": 91.6, "tf32": 183, "bf16": 362}),
         ("L4", {"fp32": 30.3, "tf32": 60, "bf16": 121}), ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125}),
         ("V100", {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7})]  # V100: no TF32/bf16 tensor cores


def peak_tflops(name: str, precision: str) -> float | None:
    for key, peaks in PEAKS:
        if key in name:
            return peaks[precision]
    return None


class Setup:
    def __init__(self, smoke: bool, batch: int):
        self.smoke = smoke
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.preset, self.num_classes = ("tiny", 5) if smoke else ("minvis_r50", 40)
        self.h, self.w = (64, 96) if smoke else (360, 640)
        self.n = batch
        self.points = 1024 if smoke else 12544
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 255, (batch, 3, self.h, self.w), dtype=torch.uint8, generator=g)
        self.targets = [{"labels": torch.randint(0, self.num_classes, (4,), generator=g),
                         "masks": (torch.rand(4, self.h, self.w, generator=g) > 0.8).to(torch.uint8), "weight": 1.0}
                        for _ in range(batch)]

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else float("nan")

    def reset_peak(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def data(self):
        """What the train loop does with a collated batch: to the device, normalise and pad."""
        from svis_ray.model import preprocess

        x = preprocess(self.images.to(self.dev, non_blocking=True), [(self.h, self.w)] * self.n)
        return x, [{**t, "labels": t["labels"].to(self.dev), "masks": t["masks"].to(self.dev)} for t in self.targets]

    def student(self, precision: str, compile: bool):
        from svis_ray.accel import CompiledModel, channels_last, set_matmul_precision
        from svis_ray.losses import SetCriterion
        from svis_ray.matcher import HungarianMatcher
        from svis_ray.model import build_model
        from svis_ray.optim import build_optimizer, build_scheduler

        set_matmul_precision(precision)
        torch.manual_seed(0)
        model = channels_last(build_model(self.preset, self.num_classes).to(self.dev).train(), self.dev)
        crit = SetCriterion(self.num_classes, HungarianMatcher(num_points=self.points), num_points=self.points).to(self.dev)
        opt = build_optimizer(model)
        return model, (CompiledModel(model) if compile else model), crit, opt, build_scheduler(opt, 10**6)


def train_rate(s: Setup, precision: str, compile: bool, steps: int, seconds: float = 0.0):
    """(images/s, peak GiB, warm-up s incl. compilation) of training steps on a fixed batch."""
    from svis_ray.optim import train_step

    _, model, crit, opt, sched = s.student(precision, compile)
    x, targets = s.data()
    t0 = time.perf_counter()
    for _ in range(2):
        train_step(model, crit, opt, sched, x, targets, precision=precision)
    s.sync()
    warm = time.perf_counter() - t0
    s.reset_peak()
    t, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - t < seconds:
        x, targets = s.data()
        train_step(model, crit, opt, sched, x, targets, precision=precision)
        done += 1
    s.sync()
    return s.n * done / (time.perf_counter() - t), s.peak_gib(), warm


def flops_per_image(s: Setup) -> float:
    """Forward + backward FLOPs of one training image (fp32 graph; precision does not change the count)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _, crit, _, _ = s.student("fp32", False)
    x, targets = s.data()
    with FlopCounterMode(display=False) as counter:
        crit.total(crit(model(x), targets)).backward()
    return counter.get_total_flops() / s.n


def step_split(s: Setup, precision: str, steps: int) -> dict[str, float]:
    """Milliseconds per step in each phase (eager; the device is synchronised between phases)."""
    from svis_ray.accel import autocast

    model, _, crit, opt, sched = s.student(precision, False)
    phases: dict[str, float] = {}

    def timed(name, fn):
        s.sync()
        t = time.perf_counter()
        out = fn()
        s.sync()
        phases[name] = phases.get(name, 0.0) + 1000 * (time.perf_counter() - t)
        return out

    for i in range(steps + 1):
        if i == 1:
            phases.clear()  # the first step warms up
        x, targets = timed("data", s.data)
        with autocast(precision, s.dev):
            outputs = timed("forward", lambda: model(x))
        layers = [outputs, *outputs["aux_outputs"]]
        timed("matcher", lambda: crit.matcher.match(layers, targets))
        loss = timed("losses", lambda: crit.total(crit(outputs, targets)))  # matches again, subtracted below
        opt.zero_grad(set_to_none=True)
        timed("backward", loss.backward)

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.01)
            opt.step()
            sched.step()
        timed("optimizer", optimizer_step)
    out = {k: v / steps for k, v in phases.items()}
    out["losses"] = max(0.0, out["losses"] - out["matcher"])
    return out


def host_syncs(s: Setup) -> int:
    from svis_ray.accel import HostSyncs
    from svis_ray.optim import train_step

    _, model, crit, opt, sched = s.student("fp32", False)
    x, targets = s.data()
    train_step(model, crit, opt, sched, x, targets)
    with HostSyncs() as syncs:
        train_step(model, crit, opt, sched, x, targets)
    return syncs.count


@torch.no_grad()
def teacher_rate(s: Setup, precision: str, compile: bool, steps: int, seconds: float = 0.0):
    """(frames/s, peak GiB, warm-up s) of the teachers' forward (``forward_frames``) on batches of frames."""
    from svis_ray.accel import channels_last, maybe_compile, set_matmul_precision
    from svis_ray.model import build_model
    from svis_ray.teacher import forward_frames

    set_matmul_precision(precision)
    model = channels_last(build_model(s.preset, s.num_classes).to(s.dev).eval(), s.dev)
    run = maybe_compile(model, compile)
    frames = s.images.permute(0, 2, 3, 1).numpy()
    t0 = time.perf_counter()
    for _ in range(2):
        forward_frames(run, frames, len(frames), s.dev, precision, 128 if compile else 32)
    s.sync()
    warm = time.perf_counter() - t0
    s.reset_peak()
    t, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - t < seconds:
        forward_frames(run, frames, len(frames), s.dev, precision, 128 if compile else 32)
        done += 1
    s.sync()
    return s.n * done / (time.perf_counter() - t), s.peak_gib(), warm


def _worker(kind: str, smoke: bool, batch: int, seconds: float, q) -> None:
    s = Setup(smoke, batch)
    rate = train_rate(s, "bf16", False, 0, seconds) if kind == "student" else teacher_rate(s, "bf16", False, 0, seconds)
    q.put((kind, rate[0]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row (20; --cpu-smoke 3)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--share-seconds", type=float, default=20.0)
    p.add_argument("--budget", type=float, default=540.0, help="seconds after which rows are skipped")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset at 64x96 on the CPU (checks the script)")
    a = p.parse_args()
    if a.cpu_smoke:
        a.steps, a.batch, a.share_seconds = a.steps or 3, min(a.batch, 2), min(a.share_seconds, 2.0)
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (bench/gpu.sh --cpu-smoke checks the script on the CPU)")
        return 1
    a.steps = a.steps or 20
    s = Setup(a.cpu_smoke, a.batch)
    name = torch.cuda.get_device_name(0) if s.dev.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {s.preset} {s.h}x{s.w} batch {s.n}", flush=True)
    start = time.perf_counter()

    def over() -> bool:
        return time.perf_counter() - start > a.budget

    def row(what: str, *cells: str) -> None:
        print(f"{what:<36}" + "".join(f"{c:>16}" for c in cells), flush=True)  # as measured: a timeout keeps the rows

    fpi = flops_per_image(s)
    row("model GFLOP per training image", f"{fpi / 1e9:.1f}")
    row(f"host syncs per train step (b{s.n})", str(host_syncs(s)))
    row("train", "images/s", "peak GiB", "% of peak", "warm-up s")
    for precision in ("bf16", "tf32", "fp32"):
        for compile in (False, True):
            label = f"  {precision} {'compiled' if compile else 'eager'}"
            if over():
                row(label, "skipped: budget")
                continue
            ips, mem, warm = train_rate(s, precision, compile, a.steps)
            peak = peak_tflops(name, precision)
            frac = f"{100 * fpi * ips / (peak * 1e12):.1f}" if peak else "n/a"
            row(label, f"{ips:.1f}", f"{mem:.1f}", frac, f"{warm:.0f}")
    if not over():
        split = step_split(s, "bf16", max(3, a.steps // 4))
        row("bf16 eager step split, ms", *[f"{k} {v:.1f}" for k, v in split.items()])
    row("teacher", "frames/s", "peak GiB", "", "warm-up s")
    for precision, compile in (("tf32", False), ("bf16", False), ("bf16", True)):
        label = f"  {precision} {'compiled' if compile else 'eager'}"
        if over():
            row(label, "skipped: budget")
            continue
        fps, mem, warm = teacher_rate(s, precision, compile, a.steps)
        row(label, f"{fps:.1f}", f"{mem:.1f}", "", f"{warm:.0f}")
    if over():
        row("sharing", "skipped: budget")
        return 0
    alone = {"student": train_rate(s, "bf16", False, 0, a.share_seconds / 2)[0],
             "teacher": teacher_rate(s, "bf16", False, 0, a.share_seconds / 2)[0]}
    s.reset_peak()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(k, a.cpu_smoke, s.n, a.share_seconds, q)) for k in ("student", "teacher")]
    for pr in procs:
        pr.start()
    shared = dict(q.get(timeout=10 * a.share_seconds + 180) for _ in procs)
    for pr in procs:
        pr.join()
    for k in ("student", "teacher"):
        row(f"{k} sharing the device / alone (bf16)", f"{shared[k] / alone[k]:.2f}")
    row("total seconds", f"{time.perf_counter() - start:.0f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
