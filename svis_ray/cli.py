"""The ``svis-ray`` command line.

Every subcommand is a thin wrapper over a library function; user errors (``SvisError``)
become one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from svis_ray.data.families import DEFAULT_FAMILY, FAMILIES
from svis_ray.errors import SvisError


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 96x128, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"frame size must be at least 32x32, got {text!r}")
    return h, w


def cmd_check_data(a: argparse.Namespace) -> None:
    from svis_ray.data.ytvis import check_data

    s = check_data(a.root, a.annotations, workers=a.workers)
    print(f"{a.annotations}: OK: {s['videos']} videos, {s['frames']} frames readable, "
          f"{s['annotations']} annotations, {s['categories']} categories")


def cmd_sparsify(a: argparse.Namespace) -> None:
    from svis_ray.data.sparsify import sparsify

    frames = None
    if a.frames_from:
        from svis_ray.suggest import load_frames

        frames = {}
        for path in a.frames_from:  # several files: their frames together (e.g. two rounds)
            for vid, ts in load_frames(path).items():
                frames[vid] = sorted(set(frames.get(vid, [])) | set(ts))
    s = sparsify(a.input, a.output, frames_per_video=a.frames_per_video, strategy=a.strategy, seed=a.seed,
                 frames=frames, frames_source=",".join(a.frames_from or []))
    print(f"{a.output}: {s['videos']} videos, {s['labelled_frames']} labelled frames "
          f"of {s['frames']}, {s['instances_kept']} instances kept of {s['instances']}, "
          f"{100 * s['mask_fraction']:.2f}% of masks kept")


def cmd_suggest_frames(a: argparse.Namespace) -> None:
    from svis_ray.suggest import suggest_frames

    s = suggest_frames(a.videos, a.frame_root, a.per_video, a.out, checkpoint=a.checkpoint, labelled=a.labelled,
                       num_actors=a.actors, gpus_per_actor=a.gpus_per_actor, window=a.window,
                       min_size=a.min_size, max_size=a.max_size)
    print(f"{a.videos}: {s['frames']} frames to label in {s['videos']} videos ({s['method']}, {s['seconds']:.1f} s)")
    for path in s["outputs"]:
        print(f"wrote {path}")


def cmd_split(a: argparse.Namespace) -> None:
    from svis_ray.data.sparsify import split

    s = split(a.input, val_fraction=a.val_fraction, seed=a.seed, train_out=a.train_out, val_out=a.val_out)
    print(f"{a.train_out}: {s['train_videos']} videos; {a.val_out}: {s['val_videos']} videos")


def cmd_demo_data(a: argparse.Namespace) -> None:
    from svis_ray.data.families import make_family_data

    s = make_family_data(a.family, a.out, videos=a.videos, frames=a.frames, size=a.size, seed=a.seed,
                         val_videos=a.val_videos)
    frames = f"{s['frames']} frames" if "total_frames" not in s else \
        f"up to {s['frames']} frames ({s['total_frames']} in all, {s['empty_videos']} empty videos)"
    print(f"{a.out}: {a.family} family, {s['train_videos']} train + {s['val_videos']} val videos, {frames} "
          f"of {s['size'][0]}x{s['size'][1]}, {s['instances']} instances, {s['categories']} categories")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from svis_ray.eval import evaluate_files, format_table

    metrics = evaluate_files(a.gt, a.results, out=a.out)
    print(format_table(metrics))
    if a.out:
        print(f"wrote {a.out}")


def cmd_train(a: argparse.Namespace) -> None:
    from svis_ray.config import load_config
    from svis_ray.eval import format_table
    from svis_ray.train import run_training

    summary = run_training(load_config(a.config, a.overrides))
    if "metrics" in summary:
        print(format_table(summary["metrics"]))
    print(f"run folder: {summary['run_dir']}; best checkpoint: {summary['checkpoint']}")


def cmd_demo(a: argparse.Namespace) -> None:
    from svis_ray.demo_job import run_demo

    run_demo(a.out, a.overrides)


def cmd_export(a: argparse.Namespace) -> None:
    from svis_ray.deploy import export_onnx

    names = None
    if a.classes:
        from svis_ray.data.ytvis import YTVIS

        names = YTVIS.load(a.classes).class_names
    s = export_onnx(a.checkpoint, a.out, height=a.height, width=a.width, dynamic=a.dynamic, class_names=names,
                    source=str(a.classes))
    axes = "batch, height and width" if s["dynamic"] else f"batch (frames up to {s['height']}x{s['width']})"
    print(f"wrote {s['out']}: ONNX opset {s['opset']}, {s['bytes'] / 2**20:.1f} MiB, dynamic {axes}; "
          f"onnx.checker OK")


def cmd_predict(a: argparse.Namespace) -> None:
    from svis_ray.predict import predict

    if a.onnx and Path(a.onnx).suffix.lower() != ".onnx":
        raise SvisError(f"{a.onnx}: --onnx takes a .onnx file (made by svis-ray export)")
    s = predict(a.onnx or a.checkpoint, a.input, a.out, frame_root=a.frame_root, zip_results=a.zip, render=a.render,
                num_actors=a.actors, gpus_per_actor=a.gpus_per_actor, min_size=a.min_size, max_size=a.max_size,
                window=a.window, topk=a.topk, fps=a.fps, render_min_score=a.min_score, tracker=a.tracker,
                precision=a.precision, compile=a.compile)
    where = "in this process" if s["in_process"] else "on Ray"
    print(f"{s['input']}: {s['videos']} videos, {s['frames']} frames in {s['seconds']:.1f} s "
          f"({s['frames_per_s']:.1f} frames/s, {where}), {s['tracks']} tracks "
          f"({s['confident_tracks']} with score >= {a.min_score}), {s['tracker']} tracker")
    for path in s["outputs"]:
        print(f"wrote {path}")


def cmd_benchmark(a: argparse.Namespace) -> None:
    from svis_ray.benchmark import BenchData, parse_seeds, run

    recipes = [r for r in a.recipes.split(",") if r] if a.recipes else None
    if a.data and a.family:
        raise SvisError("benchmark: give --data (your YTVIS data) or --family (generated demo data), not both")
    if not a.data and (a.train_json or a.val_json):
        raise SvisError("benchmark: --train-json and --val-json need --data")
    bench = BenchData(family=None if a.data else (a.family or DEFAULT_FAMILY), root=a.data,
                      train_json=a.train_json or "train.json", val_json=a.val_json, val_fraction=a.val_fraction,
                      min_size=a.min_size, max_size=a.max_size)
    if run(a.out, parse_seeds(a.seeds), a.overrides, recipes=recipes, reuse=a.reuse, bench=bench) != 0:
        raise SvisError(f"{a.out}/accuracy.json: benchmark goals missed (see the table above)")


def cmd_pseudo_quality(a: argparse.Namespace) -> None:
    from svis_ray.config import load_config
    from svis_ray.eval.pseudo_quality import format_quality, pseudo_quality
    from svis_ray.io import write_json
    from svis_ray.model import load_checkpoint

    cfg = load_config(a.config, a.overrides)
    model, info = load_checkpoint(a.checkpoint)
    gallery = None
    if a.render:
        from svis_ray.pictures import PseudoLabelGallery

        gallery = PseudoLabelGallery(a.render, info["class_names"])
    report = pseudo_quality(cfg, model, a.gt, thresholds=a.thresholds, max_videos=a.videos, iou=a.iou,
                            on_frame=gallery)
    print(format_quality(report))
    if a.out:
        write_json(a.out, report, indent=1)
        print(f"wrote {a.out}")
    if gallery:
        gallery.flush()
        print(f"wrote {len(gallery.written)} pictures of pseudo-labels (ground truth above) to {a.render}")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.8,0.9, got {text!r}") from None


def cmd_config(a: argparse.Namespace) -> None:
    import yaml

    from svis_ray.config import load_config, reference_markdown

    if a.reference:
        if a.config or a.overrides:
            raise SvisError("config --reference: takes no --config or key=value (it documents the defaults)")
        print(reference_markdown(), end="")
        return
    print(yaml.safe_dump(load_config(a.config, a.overrides).to_dict(), sort_keys=False), end="")


def cmd_tune(a: argparse.Namespace) -> None:
    from svis_ray.tuning import run_sweep

    run_sweep(a.config, a.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svis-ray", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Semi-supervised video instance segmentation on Ray "
                                            "(MinVIS student, pseudo-labelling teacher pool).",
                                epilog="example:\n  svis-ray demo        # then: svis-ray COMMAND --help")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(_add_command, sub)

    s = add("check-data", help="validate a YTVIS JSON and decode every frame file",
            example="svis-ray check-data demo/data demo/data/train.json")
    s.add_argument("root", help="dataset root holding JPEGImages/")
    s.add_argument("annotations", help="YTVIS annotation JSON")
    s.add_argument("--workers", type=int, default=4, help="decode threads")
    s.set_defaults(func=cmd_check_data)

    s = add("sparsify", help="keep K labelled frames per video (MinVIS '1%%' etc.)",
            example="svis-ray sparsify demo/data/train.json demo/data/train_1frame.json --frames-per-video 1")
    s.add_argument("input", help="fully annotated YTVIS JSON")
    s.add_argument("output", help="sparse YTVIS JSON to write")
    s.add_argument("--frames-per-video", type=int, default=1, help="labelled frames kept per video")
    s.add_argument("--strategy", choices=["middle", "random-instance", "uniform"], default="middle",
                   help="middle frame(s); random frames with an instance (Sparse-MinVIS); evenly spaced")
    s.add_argument("--seed", type=int, default=0, help="seed of random-instance")
    s.add_argument("--frames-from", action="append", default=None, metavar="SUGGESTIONS_JSON",
                   help="keep exactly the frames this suggest-frames file names (repeat: their union); "
                        "overrides --strategy and --frames-per-video")
    s.set_defaults(func=cmd_sparsify)

    s = add("suggest-frames", help="choose the K frames of each video to send to annotators",
            example="svis-ray suggest-frames demo/data/train.json --frame-root demo/data --per-video 1 "
                    "--out suggestions.json")
    s.add_argument("videos", help="YTVIS JSON of the videos (annotations not needed)")
    s.add_argument("--frame-root", default=None, help="dataset folder holding JPEGImages/ (default: the JSON's)")
    s.add_argument("--per-video", type=int, default=1, help="frames to label per video")
    s.add_argument("--out", required=True, help="suggestions JSON to write (and a .csv next to it)")
    s.add_argument("--checkpoint", default=None,
                   help="score frames by this model's uncertainty (Ray Data actor pool); default: model-free "
                        "colour-cluster coverage")
    s.add_argument("--labelled", default=None, metavar="JSON",
                   help="frames already labelled (a suggestions file or a sparse YTVIS file): suggest others")
    s.add_argument("--actors", type=int, default=1, help="scoring actors (with --checkpoint)")
    s.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, e.g. 1 or 0.5")
    s.add_argument("--window", type=int, default=30, help="frames per model forward")
    s.add_argument("--min-size", type=int, default=None, help="inference short side (default: training's)")
    s.add_argument("--max-size", type=int, default=None, help="inference long-side cap (default: training's)")
    s.set_defaults(func=cmd_suggest_frames)

    s = add("split", help="hold out a validation split, by video",
            example="svis-ray split demo/data/train.json --train-out train_split.json --val-out val_split.json")
    s.add_argument("input", help="YTVIS JSON to split")
    s.add_argument("--val-fraction", type=float, default=0.1, help="share of the videos held out")
    s.add_argument("--seed", type=int, default=0, help="seed of the draw")
    s.add_argument("--train-out", required=True, help="JSON of the remaining videos")
    s.add_argument("--val-out", required=True, help="JSON of the held-out videos")
    s.set_defaults(func=cmd_split)

    s = add("demo-data", help="write a synthetic demo dataset (YTVIS 2019 layout)",
            example="svis-ray demo-data --out demo_data --videos 8 --val-videos 2 --family creatures")
    s.add_argument("--out", required=True, help="folder to write (JPEGImages/, train.json, val.json)")
    s.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY,
                   help="shapes: rigid shapes, 12 frames of 96x128 (svis-ray demo's); creatures: deforming "
                        "textured creatures, 6-36 frames of 80x144, camera pan and zoom, empty videos")
    s.add_argument("--videos", type=int, default=None, help="training videos")
    s.add_argument("--val-videos", type=int, default=None, help="held-out videos")
    s.add_argument("--frames", type=int, default=None, help="frames per video (creatures: the longest video)")
    s.add_argument("--size", type=_size, default=None, help="frame size HxW")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator")
    s.set_defaults(func=cmd_demo_data)

    s = add("evaluate", help="YouTube-VIS mask AP of a results.json",
            example="svis-ray evaluate --gt demo/data/val.json --results demo/run/results.json --out metrics.json")
    s.add_argument("--gt", required=True, help="ground-truth YTVIS JSON")
    s.add_argument("--results", required=True, help="results.json (CodaLab format)")
    s.add_argument("--out", default=None, help="write metrics JSON here")
    s.set_defaults(func=cmd_evaluate)

    s = add("train", help="semi-supervised training (Ray Train student + teacher pool)",
            example="svis-ray train --config configs/debug.yaml data.root=demo/data output.dir=runs/mine")
    s.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    s.set_defaults(func=cmd_train)

    s = add("demo", help="demo data -> 1-frame subset -> semi-supervised training -> AP",
            example="svis-ray demo --out demo pseudo.refine=none")
    s.add_argument("--out", default="demo", help="folder for the demo data and run")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on configs/debug.yaml")
    s.set_defaults(func=cmd_demo)

    s = add("tune", help="Ray Tune sweep over pseudo-label thresholds and loss weights",
            example="svis-ray tune --config configs/tune_debug.yaml data.root=demo/data")
    s.add_argument("--config", required=True, help="sweep YAML, e.g. configs/tune_debug.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the sweep or its base config")
    s.set_defaults(func=cmd_tune)

    s = add("benchmark", help="accuracy benchmark: full vs 1 frame vs Sparse-MinVIS vs svis-ray",
            example="svis-ray benchmark --data my_data --train-json train.json --out bench_mine --seeds 0")
    s.add_argument("--family", choices=FAMILIES, default=None,
                   help=f"generated demo family to measure on (default {DEFAULT_FAMILY}; see demo-data)")
    s.add_argument("--data", default=None, metavar="DIR",
                   help="your fully labelled YTVIS data instead: the folder holding JPEGImages/")
    s.add_argument("--train-json", default=None, help="with --data: the training videos' full labels (default train.json)")
    s.add_argument("--val-json", default=None,
                   help="with --data: held-out videos with full labels (default: hold out --val-fraction of --train-json)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="with --data and no --val-json: videos held out")
    s.add_argument("--min-size", type=int, default=None, help="short side to train and test at (default: the frames', at most 360)")
    s.add_argument("--max-size", type=int, default=None, help="long-side cap (default: 256 or the frames' long side at --min-size)")
    s.add_argument("--out", default="bench_out", help="folder for the runs and accuracy.{json,txt,png}")
    s.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    s.add_argument("--recipes", default=None, help="train these for every seed, e.g. svis_ray (default: all four; with --reuse, none)")
    s.add_argument("--reuse", default=None, metavar="ACCURACY_JSON",
                   help="take the other recipes' seeds from this earlier result, if trained the same way; "
                        "train the seeds it lacks")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="overrides on configs/debug.yaml for all runs")
    s.set_defaults(func=cmd_benchmark)

    s = add("pseudo-quality", help="precision/recall of a checkpoint's pseudo-labels against full labels",
            example="svis-ray pseudo-quality --config configs/debug.yaml --checkpoint demo/run/best.pt "
                    "--gt train.json data.root=demo/data")
    s.add_argument("--config", required=True, help="training config: data.root, data.train_json (sparse), pseudo.*")
    s.add_argument("--checkpoint", required=True, help="svis-ray checkpoint used as the teacher")
    s.add_argument("--gt", required=True, help="the training split's full annotation JSON (under data.root if relative)")
    s.add_argument("--thresholds", type=_floats, default=None, help="extra pseudo.score_threshold values, e.g. 0.8,0.9")
    s.add_argument("--videos", type=int, default=None, help="score only the first N videos")
    s.add_argument("--iou", type=float, default=0.5, help="mask IoU at which a pseudo-label counts as correct")
    s.add_argument("--out", default=None, help="write the report as JSON here")
    s.add_argument("--render", default=None, metavar="DIR",
                   help="write DIR/video_<id>.png: pseudo-labels marked correct or by their kind of mistake")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pseudo.anchor=false")
    s.set_defaults(func=cmd_pseudo_quality)

    s = add("predict", help="predict tracks for a YTVIS split, a frame folder or a video file",
            example="svis-ray predict demo/data/val.json --checkpoint demo/run/best.pt --out preds --render")
    s.add_argument("input", help="YTVIS JSON (e.g. valid.json), a folder of frames, or a video file")
    model = s.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint",
                       help="svis-ray checkpoint (best.pt of a training run) or an official MinVIS/Mask2Former-VIS "
                            "R50 .pth (class names from the JSON's categories)")
    model.add_argument("--onnx", help="ONNX model from svis-ray export, run by onnxruntime instead of PyTorch")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--frame-root", default=None, help="dataset folder holding JPEGImages/ (default: the JSON's)")
    s.add_argument("--zip", action="store_true", help="also write submission.zip (results.json only)")
    s.add_argument("--render", action="store_true", help="write overlay videos (<name>.overlay.mp4)")
    s.add_argument("--actors", type=int, default=1, help="predictor actors (YTVIS JSON input)")
    s.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, e.g. 1 or 0.5")
    s.add_argument("--min-size", type=int, default=None, help="inference short side (default: training's or 360)")
    s.add_argument("--max-size", type=int, default=None, help="inference long-side cap (default: training's or 1333)")
    s.add_argument("--window", type=int, default=30, help="frames per model forward")
    s.add_argument("--topk", type=int, default=10, help="tracks kept per video")
    s.add_argument("--tracker", choices=["minvis", "svis"], default=None,
                   help="minvis: MinVIS's embedding matching; svis: + mask IoU and absent-frame blanking "
                        "(default: the checkpoint's; minvis for an official checkpoint)")
    s.add_argument("--fps", type=float, default=None, help="frame rate of rendered frame folders (default 6)")
    s.add_argument("--min-score", type=float, default=0.3, help="tracks drawn and counted as confident")
    s.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default="fp32",
                   help="model numerics on a GPU (bf16: autocast, deformable sampling in fp32); the CPU runs fp32")
    s.add_argument("--compile", action="store_true", help="torch.compile the per-frame model (minutes of warm-up)")
    s.set_defaults(func=cmd_predict)

    s = add("export", help="export a checkpoint's per-frame model to ONNX (for predict --onnx)",
            example="svis-ray export --checkpoint demo/run/best.pt --out model.onnx --dynamic")
    s.add_argument("--checkpoint", required=True, help="svis-ray checkpoint, or an official MinVIS .pth with --classes")
    s.add_argument("--out", required=True, help="ONNX file to write (atomically)")
    s.add_argument("--height", type=int, default=None,
                   help="example input height, rounded up to /32 (default: the checkpoint's short test side)")
    s.add_argument("--width", type=int, default=None,
                   help="example input width, rounded up to /32 (default: the checkpoint's long-side cap)")
    s.add_argument("--dynamic", action="store_true",
                   help="dynamic height and width (else the model takes frames up to the example size, zero-padded)")
    s.add_argument("--classes", default=None, metavar="YTVIS_JSON",
                   help="a JSON whose categories name an official checkpoint's classes")
    s.set_defaults(func=cmd_export)

    s = add("config", help="print the resolved configuration as YAML, or the reference of every key",
            example="svis-ray config --config configs/debug.yaml pseudo.score_threshold=0.8")
    s.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    s.add_argument("--reference", action="store_true",
                   help="print docs/config.md: every key with its type, default and meaning")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    s.set_defaults(func=cmd_config)

    return p


def _add_command(sub, name: str, *, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with one example."""
    return sub.add_parser(name, help=help, description=(help[0].upper() + help[1:] + ".").replace("%%", "%"),
                          epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from svis_ray import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"svis-ray {__version__} (ray {installed('ray')}, torch {installed('torch')})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SvisError as e:
        ray, train = sys.modules.get("ray"), sys.modules.get("svis_ray.train")
        # Flush Ray's worker logs first, so the error is the last line printed; a Ray this process
        # did not start (a test session's, a caller's) is left running.
        if ray is not None and ray.is_initialized() and train is not None and train.STARTED_RAY:
            ray.shutdown()
            train.STARTED_RAY = False
        print(f"svis-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svis-ray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
