"""Scale (issue 24, item 7): the video order of a clip costs O(1) (keyed Feistel permutation), the
schedule is O(clips) and streamed, the split is parsed once per run and shared by reference
(worker-group restarts, Tune trials), and predict spools its results to the out folder."""
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from svis_ray.data import ingest
from svis_ray.data.ingest import SharedSplit, SplitIndex, clip_rows, permute, share_split
from svis_ray.data.sparsify import sparsify
from svis_ray.data.ytvis import YTVIS
from svis_ray.errors import SvisError
from svis_ray.eval.results import ResultSpool

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the video order
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 10, 100, 257, 1000, 4097, 65536])
def test_permutation_is_a_bijection_of_range_n(n):
    order = permute(np.arange(n), n, (0, 3))
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(permute(np.arange(n), n, (0, 3)), order)  # a pure function of (key, n)
    some = np.array([n - 1, 0, n // 2])
    assert np.array_equal(permute(some, n, (0, 3)), order[some])  # any slot alone, same value
    if n >= 8:  # another seed or pass: another order
        assert not np.array_equal(permute(np.arange(n), n, (1, 3)), order)
        assert not np.array_equal(permute(np.arange(n), n, (0, 4)), order)
        assert not np.array_equal(order, np.arange(n))


def toy_index(n: int, length: int = 2) -> SplitIndex:
    """n videos of ``length`` frames, the first labelled, no instances: built from arrays directly."""
    full = np.full(n, length, np.int64)
    names = pa.array(np.char.add(np.repeat(np.arange(n).astype(str), length), "/f.jpg").tolist())
    return SplitIndex(source="toy", class_names=["a"], video_id=np.arange(1, n + 1), height=full * 4, width=full * 4,
                      length=full, frame_start=np.arange(0, length * n + 1, length), file_names=names,
                      labelled_start=np.arange(n + 1), labelled_frame=np.zeros(n, np.int32),
                      gt_start=np.zeros(n + 1, np.int64), gt_id=np.zeros(0, np.int64),
                      gt_label=np.zeros(0, np.int32), gt_crowd=np.zeros(0, np.uint8),
                      gt_seg=pa.array([], pa.string()), gt_raw=np.zeros(0, bool))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_first_clips_of_a_large_split_touch_only_their_own_videos(monkeypatch):
    n = 200_000
    index = toy_index(n)
    # The measure sees an O(videos) order: numpy reports its buffers to tracemalloc.
    assert _peak_bytes(lambda: np.random.default_rng([0, 0]).permutation(n)) >= 8 * n
    evaluated = []
    real = ingest.permute
    monkeypatch.setattr(ingest, "permute", lambda slots, n, key: evaluated.append(len(slots)) or real(slots, n, key))
    rows = []
    peak = _peak_bytes(lambda: rows.extend(index.clip_rows(np.arange(16), "/data", 2, seed=0)))
    assert peak < 8 * n / 8  # well under one int64 per video
    assert evaluated == [16]  # the order is evaluated at the 16 slots, not over the videos
    assert len({r["video_id"] for r in rows}) == 16 and all(r["frame_idx"][0] == 0 for r in rows)
    # a clip deep into the run (pass 40) costs the same: one evaluation of one slot
    evaluated.clear()
    late = index.clip_rows(np.array([40 * n + 5]), "/data", 2, seed=0)[0]
    assert evaluated == [1] and late["clip_index"] == 40 * n + 5


def test_index_holds_the_same_ground_truth_as_the_file(tmp_path):
    """Compressed RLE, uncompressed RLE and polygons; null frames; a sparse labelled_frames list."""
    h, w = 6, 5
    rle = {"size": [h, w], "counts": [3, 4, 23]}  # uncompressed
    poly = [[0.0, 0.0, 4.0, 0.0, 4.0, 3.0]]
    data = {"categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
            "videos": [{"id": 5, "width": w, "height": h, "length": 3, "file_names": ["v/0.jpg", "v/1.jpg", "v/2.jpg"]},
                       {"id": 9, "width": w, "height": h, "length": 2, "file_names": ["u/0.jpg", "u/1.jpg"],
                        "labelled_frames": [1]}],
            "annotations": [{"id": 1, "video_id": 5, "category_id": 7, "segmentations": [rle, None, poly]},
                            {"id": 2, "video_id": 5, "category_id": 3, "iscrowd": 1, "segmentations": [poly, rle, None]},
                            {"id": 3, "video_id": 9, "category_id": 3, "segmentations": [None, poly]}]}
    ds = YTVIS(data, source="toy")
    compressed = ds.annotations_on_frame(5, 0)[0]["rle"]  # a compressed RLE as a third kind
    data["annotations"].append({"id": 4, "video_id": 9, "category_id": 7, "segmentations": [None, compressed]})
    ds = YTVIS(data, source="toy")
    index = SplitIndex.from_ytvis(ds)
    assert index.class_names == ds.class_names and index.num_videos == 2
    for v, video in enumerate(ds.videos):
        for t in ds.labelled_frames(video["id"]):
            assert index._instances(v, t) == ds.annotations_on_frame(video["id"], t)
    rows = clip_rows(index, "/r", 6, 2, seed=1)
    assert clip_rows(ds, "/r", 6, 2, seed=1) == rows  # a YTVIS is indexed on the way
    for r in rows:
        gt = json.loads(r["gt_json"])
        for t, g in zip(r["frame_idx"], gt):
            labelled = t in ds.labelled_frames(r["video_id"])
            assert (g == ds.annotations_on_frame(r["video_id"], t)) if labelled else g is None


# ----------------------------------------------------------------------------- parsed once
@pytest.fixture()
def sparse_split(demo_root, tmp_path):
    sparsify(str(demo_root / "train.json"), str(tmp_path / "train_1frame.json"), strategy="middle")
    return str(tmp_path / "train_1frame.json")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_worker_group_restarts_stream_the_schedule_from_the_one_shared_index(ray_local, demo_root, sparse_split,
                                                                             tmp_path, monkeypatch):
    import ray

    from svis_ray.config import load_config
    from svis_ray.train import make_dataset_factory, num_clips

    parses = []
    real = ingest._one_shot
    monkeypatch.setattr(ingest, "_one_shot", lambda fn, *a: parses.append(fn.__name__) or real(fn, *a))
    monkeypatch.setattr(ingest, "load_split", lambda *a: pytest.fail("parsed outside the one-shot task"))
    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        f"data.root={demo_root}", f"data.train_json={sparse_split}", f"output.dir={tmp_path / 'run'}",
        "teacher.mode=online", "train.max_steps=5", "train.milestones=[]", "data.clips_per_step=2",
        "data.min_size_train=[32]"])
    shared = share_split(str(demo_root), sparse_split)
    assert parses == ["_build_index"] and shared.num_videos == 8 and shared.nbytes > 0
    # Train ships the factory to its controller and calls it at every worker-group start.
    factory = ray.get(ray.put(make_dataset_factory(cfg, 1, len(shared.class_names), None, None, shared)))
    starts = [factory(), factory()]
    assert parses == ["_build_index"]
    expected = clip_rows(ingest.SplitIndex.from_ytvis(YTVIS.load(sparse_split)), str(demo_root), num_clips(cfg, 1),
                         1 + cfg.data.unlabelled_per_clip, cfg.train.seed)
    for ds in starts:
        got = sorted(((int(r["clip_index"]), int(r["video_id"]), list(r["frame_idx"])) for r in ds.take_all()))
        assert got == [(r["clip_index"], r["video_id"], r["frame_idx"]) for r in expected]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_bad_split_fails_in_one_line_from_the_one_shot_task(ray_local, tmp_path):
    (tmp_path / "bad.json").write_text('{"videos": [')
    (tmp_path / "ok.json").write_text(json.dumps({"videos": [], "categories": []}))
    with pytest.raises(SvisError, match=r"bad.json: malformed JSON at line 1") as e:
        share_split(str(tmp_path), "bad.json")
    assert "\n" not in str(e.value)
    with pytest.raises(SvisError, match="val.json: file not found"):  # the held-out split, checked alongside
        share_split(str(tmp_path), "ok.json", check=("val.json",))


def test_trials_share_the_sweeps_index_unless_they_train_on_another_split(monkeypatch, tmp_path):
    import ray.tune
    import ray.tune.integration.ray_train

    import svis_ray.train
    from svis_ray import tuning
    from svis_ray.config import load_config

    base = load_config(ROOT / "configs" / "debug.yaml", [f"data.root={tmp_path}"]).to_dict()
    shared = SharedSplit(root=str(tmp_path), rel="train_1frame.json", source="s", class_names=("a",), num_videos=1,
                         nbytes=1, ref=None)
    got, built = [], []
    monkeypatch.setattr(svis_ray.train, "run_training", lambda cfg, callbacks, split: got.append(
        svis_ray.train.training_split(cfg, split)))
    monkeypatch.setattr(ingest, "share_split", lambda root, rel, check=(): built.append(rel) or "own")
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", object)  # outside a Tune session

    class Context:
        def __init__(self, trial): self.trial = trial
        def get_trial_id(self): return self.trial

    for trial, params in [("t1", {"train.lr": 1e-3}), ("t2", {"train.lr": 1e-4}),
                          ("t3", {"data.train_json": "train.json"})]:
        monkeypatch.setattr(ray.tune, "get_context", lambda trial=trial: Context(trial))
        tuning._run_trial(params, base, str(tmp_path / "trials"), "val_AP", split=shared)
    assert got == [shared, shared, "own"] and built == ["train.json"]


# ----------------------------------------------------------------------------- predict's spool
def test_result_spool_keeps_records_on_disk_and_writes_them_in_video_order(tmp_path):
    spool = ResultSpool(tmp_path)
    path = tmp_path / ".results.spool"
    videos = {2: [{"video_id": 3, "score": 0.5}], 0: [{"video_id": 1, "score": 0.9}, {"video_id": 1, "score": 0.1}],
              1: []}
    sizes = []
    for i, records in videos.items():  # in the order the actors finish
        assert spool.add(i, json.dumps(records)) == records
        sizes.append(path.stat().st_size)
    assert sizes == sorted(sizes) and sizes[0] > 0 and sizes[-1] == spool.spool.size
    assert list(spool.scores) == [0.5, 0.9, 0.1]
    assert spool.records(0) == videos[0]
    spool.write(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == videos[0] + videos[1] + videos[2]
    spool.close()
    assert not path.exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_predict_writes_each_video_to_the_spool_as_it_arrives(ray_local, demo_root, tmp_path, one_torch_thread):
    from svis_ray.model import build_model, save_checkpoint
    from svis_ray.predict import predict

    names = YTVIS.load(demo_root / "val.json").class_names
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, build_model("tiny", len(names)), names, extra={"step": 0})
    out = tmp_path / "out"
    sizes = []

    def log(line: str) -> None:  # a progress line follows each video
        if line.startswith("["):
            sizes.append((out / ".results.spool").stat().st_size)

    s = predict(ckpt, demo_root / "val.json", out, log=log, min_size=96, max_size=128)
    assert len(sizes) == 2 and 0 < sizes[0] < sizes[1]  # on disk video by video, not at the end
    results = json.loads((out / "results.json").read_text())
    assert len(results) == s["tracks"] == 20 and [r["video_id"] for r in results] == sorted(r["video_id"] for r in results)
    assert not (out / ".results.spool").exists()
