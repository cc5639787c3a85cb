"""Per-frame model throughput on the CPU: onnxruntime vs PyTorch eager vs torch.compile.

    python bench/export.py [--batch 1,8] [--threads 1] [--repeats 5] [--seconds 2]

The ``tiny`` preset at the demo frame size (96x128), exported as ``svis-ray export --dynamic``
does, run on the same preprocessed demo-like input by the three runtimes, side by side in one
process: each repeat times every runtime in turn for about ``--seconds`` (round-robin, so load
from other processes hits all three alike), and the median frames/s of each is reported with its
ratio to eager. Weights are seeded, not trained: the work per frame does not depend on them.
``--threads``: intra-op threads of torch and onnxruntime alike (1 = a Ray predictor actor).
Also prints each runtime's max abs difference to eager on the class and mask logits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svis_ray.deploy import FinalOutputs, OnnxModel, export_onnx  # noqa: E402
from svis_ray.model import build_model, preprocess_frames, save_checkpoint  # noqa: E402

SIZE = (96, 128)  # the demo frames
NUM_CLASSES = 6  # the demo categories


def frames_per_s(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Call ``run`` (one batch) until ``seconds`` have passed (at least 3 times) -> frames/s."""
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        run()
        n += 1
    return n * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,8", help="comma-separated frames per forward")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime")
    ap.add_argument("--repeats", type=int, default=5, help="round-robin repeats (the median is reported)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per runtime per repeat")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES).eval()
    with tempfile.TemporaryDirectory() as d:
        ckpt = save_checkpoint(Path(d) / "tiny.pt", model, [f"c{i}" for i in range(NUM_CLASSES)])
        start = time.perf_counter()
        export_onnx(ckpt, Path(d) / "tiny.onnx", *SIZE, dynamic=True)
        export_s = time.perf_counter() - start
        runtime = OnnxModel(Path(d) / "tiny.onnx", ["CPUExecutionProvider"])  # reads torch's thread count
    final = FinalOutputs(model).eval()
    compiled = torch.compile(final)
    rng = np.random.default_rng(0)
    print(f"# tiny preset, {SIZE[0]}x{SIZE[1]} frames, {a.threads} intra-op thread(s), torch {torch.__version__}, "
          f"median of {a.repeats} round-robin repeats of ~{a.seconds:g} s; export took {export_s:.1f} s")
    for batch in (int(b) for b in a.batch.split(",")):
        x = preprocess_frames([rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(batch)])
        with torch.no_grad():
            ref = final(x)
            start = time.perf_counter()
            got_compiled = compiled(x)  # compiles for this shape
            compile_s = time.perf_counter() - start
        got_onnx = runtime(x)
        runners: dict[str, Callable[[], object]] = {
            "eager": torch.no_grad()(lambda: final(x)),
            "torch.compile": torch.no_grad()(lambda: compiled(x)),
            "onnxruntime": lambda: runtime(x),
        }
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(a.repeats):
            for name, run in runners.items():
                rates[name].append(frames_per_s(run, batch, a.seconds))
        med = {k: statistics.median(v) for k, v in rates.items()}
        diff = {"torch.compile": [float((g - r).abs().max()) for g, r in zip(got_compiled[:2], ref[:2])],
                "onnxruntime": [float((got_onnx[k] - r).abs().max()) for k, r in zip(("pred_logits", "pred_masks"), ref)]}
        print(f"batch {batch} (torch.compile warm-up {compile_s:.1f} s):")
        for name in runners:
            spread = f"{min(rates[name]):.1f}..{max(rates[name]):.1f}"
            parity = (f", max |diff| to eager: logits {diff[name][0]:.1e}, masks {diff[name][1]:.1e}"
                      if name in diff else "")
            print(f"  {name:14s} {med[name]:7.1f} frames/s ({spread})  x{med[name] / med['eager']:.2f} of eager{parity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
