import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svis_ray.model.minvis import PIXEL_MEAN, PIXEL_STD
from svis_ray.tracking import match_embeddings, track_video, tracks_to_results

Q, K, C = 6, 4, 16
h, w = 40, 72  # inference frame size; padded to 64 x 96, masks at 16 x 24
T = 10


def frame_index(images: torch.Tensor) -> torch.Tensor:
    """[B] the value t that video() filled each frame with, read back from the model's input
    (normalised: (t - mean) / std; the padding is 0)."""
    return (images[:, 0, 0, 0] * PIXEL_STD[0] + PIXEL_MEAN[0]).round().long()


def object_masks(t: int) -> torch.Tensor:
    """Mask logits [Q, 16, 24] of the Q objects at frame t: object j is a 1x4 block in row j + 2
    that moves right by one cell per frame, inside the unpadded 10 x 18 area."""
    m = torch.full((Q, 16, 24), -10.0)
    for j in range(Q):
        x = (2 * j + t) % 14
        m[j, j + 2, x:x + 4] = 10.0
    return m


class PermutingModel(nn.Module):
    """Fake MinVIS student. Frame t is recognised by its pixel value; its queries hold the Q
    objects in a random per-frame order (embeddings, logits and masks permuted together)."""

    def __init__(self, permute: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.embeddings = torch.randn(Q, C, generator=g)
        self.logits = torch.randn(Q, K + 1, generator=g)
        self.permute = permute
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> dict:
        assert images.dtype == torch.float32 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        assert not self.training
        assert (images[:, :, h:] == 0).all() and (images[:, :, :, w:] == 0).all()  # normalised, then padded
        self.calls.append(tuple(images.shape))
        out = {"pred_logits": [], "pred_masks": [], "pred_embds": []}
        for t in frame_index(images).tolist():
            g = torch.Generator().manual_seed(100 + t)
            order = torch.randperm(Q, generator=g) if self.permute else torch.arange(Q)
            drift = 0.1 * torch.randn(Q, C, generator=g)  # embeddings are similar, not equal
            out["pred_embds"].append((self.embeddings + drift)[order])
            out["pred_logits"].append((self.logits + 0.1 * t)[order])
            out["pred_masks"].append(object_masks(t)[order])
        return {k: torch.stack(v) for k, v in out.items()}


def video(num_frames: int = T) -> list[np.ndarray]:
    return [np.full((h, w, 3), t, dtype=np.uint8) for t in range(num_frames)]


def test_match_embeddings_inverts_a_permutation():
    g = torch.Generator().manual_seed(1)
    prev = torch.randn(8, C, generator=g)
    order = torch.randperm(8, generator=g)
    cur = 3.0 * prev[order] + 0.05 * torch.randn(8, C, generator=g)  # scale must not matter
    perm = match_embeddings(prev, cur)
    assert perm.dtype == torch.int64
    assert torch.equal(order[perm], torch.arange(8))


def test_mask_overlap_separates_queries_with_identical_embeddings():
    # Two objects of one class: same embedding, so only the masks can tell them apart.
    emb = torch.ones(2, C)
    left, right = torch.full((2, 8, 8), -1.0), torch.full((2, 8, 8), -1.0)
    left[0, :, :4] = left[1, :, 4:] = 1.0  # previous frame: query 0 left, query 1 right
    right[1, :, :3] = right[0, :, 5:] = 1.0  # current frame: the raw query order is swapped
    assert torch.equal(match_embeddings(emb, emb, left, right), torch.tensor([1, 0]))
    assert torch.equal(match_embeddings(emb, emb, left, right, mask_weight=0), torch.tensor([0, 1]))


def test_track_masks_are_empty_where_the_query_is_confidently_absent():
    class VanishingModel(nn.Module):
        """One query on a fixed block; it predicts no-object on frames 2 and 3."""

        def forward(self, images):
            n = len(images)
            frame = frame_index(images)
            logits = torch.full((n, 1, 2), -10.0)
            logits[:, 0, 0] = 10.0
            logits[(frame == 2) | (frame == 3), 0, 1] = 20.0
            masks = torch.full((n, 1, h // 4, w // 4), 5.0)
            return {"pred_logits": logits, "pred_masks": masks, "pred_embds": torch.ones(n, 1, C)}

    track, = track_video(VanishingModel(), video(5), topk=1, out_size=(h, w), device="cpu", tracker="svis")
    assert [bool(m.any()) for m in track["masks"]] == [True, True, False, False, True]
    kept, = track_video(VanishingModel(), video(5), topk=1, out_size=(h, w), device="cpu", tracker="minvis")
    assert all(m.all() for m in kept["masks"])  # plain MinVIS keeps every frame's mask
    assert track_video(VanishingModel(), video(5), topk=1, out_size=(h, w), device="cpu")[0]["masks"].all()  # default


def test_unknown_tracker_is_one_line_error():
    from svis_ray.errors import SvisError

    with pytest.raises(SvisError, match="unknown tracker 'mivis'"):
        track_video(PermutingModel(), video(2), tracker="mivis")


def test_tracker_realigns_permuted_queries():
    model = PermutingModel(permute=True)
    tracks = track_video(model, iter(video()), window=4, topk=8, out_size=(h, w))
    reference = track_video(PermutingModel(permute=False), video(), window=4, topk=8, out_size=(h, w))

    assert len(tracks) == 8
    for track, ref in zip(tracks, reference):
        assert track["label"] == ref["label"] and track["score"] == pytest.approx(ref["score"])
        np.testing.assert_array_equal(track["masks"], ref["masks"])
    # Each track covers its own object's block in every frame.
    scores = torch.softmax(model.logits + 0.1 * (T - 1) / 2, -1)[:, :-1]
    for track in tracks:
        obj = [j for j in range(Q) if scores[j, track["label"]].item() == pytest.approx(track["score"])]
        assert len(obj) == 1
        for t in range(T):
            logits = F.interpolate(object_masks(t)[None, obj], size=(64, 96), mode="bilinear")
            expected = (logits[0, 0, :h, :w] > 0).numpy()
            assert expected.sum() > 0
            np.testing.assert_array_equal(track["masks"][t], expected)


def test_windows_do_not_change_tracks():
    whole = track_video(PermutingModel(), video(), window=T, topk=5)
    model = PermutingModel()
    chunked = track_video(model, video(), window=3, topk=5)
    assert [c[0] for c in model.calls] == [3, 3, 3, 1]
    for a, b in zip(whole, chunked, strict=True):
        assert (a["label"], a["score"]) == (b["label"], b["score"])
        np.testing.assert_array_equal(a["masks"], b["masks"])


class StaticModel(nn.Module):
    """Same prediction for every frame, with hand-set logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, images):
        b = len(images)
        masks = torch.full((Q, images.shape[2] // 4, images.shape[3] // 4), -1.0)
        masks[:, :2, :2] = 1.0
        return {"pred_logits": self.logits.expand(b, -1, -1), "pred_masks": masks.expand(b, -1, -1, -1),
                "pred_embds": torch.eye(Q, C).expand(b, -1, -1)}


def test_topk_ranks_query_class_pairs():
    logits = torch.zeros(Q, K + 1)
    logits[2, 1], logits[2, 3] = 4.0, 3.5  # query 2 is confident in two classes
    logits[5, 0] = 6.0
    logits[:, K] = 1.0
    model = StaticModel(logits)
    model.train()
    tracks = track_video(model, video(3), topk=3, out_size=(20, 36))
    assert model.training  # mode restored

    scores = logits.softmax(-1)[:, :-1]
    assert [t["label"] for t in tracks] == [0, 1, 3]
    assert [t["score"] for t in tracks] == pytest.approx(scores[[5, 2, 2], [0, 1, 3]].tolist())
    assert tracks[0]["masks"].shape == (3, 20, 36) and tracks[0]["masks"].dtype == bool
    # The 2x2 low-res block at 1/4 of a 64x96 padded frame, cropped to 40x72, scaled by 1/2.
    assert tracks[0]["masks"][:, :4, :4].all() and not tracks[0]["masks"][:, 5:, 5:].any()


def test_results_records_hold_one_rle_per_frame():
    tracks = track_video(PermutingModel(), video(), topk=3, out_size=(30, 50))
    records = tracks_to_results(tracks, video_id=7, idx_to_cat={c: c + 1 for c in range(K)})

    assert len(records) == 3
    for record, track in zip(records, tracks):
        assert record["video_id"] == 7 and record["category_id"] == track["label"] + 1
        assert record["score"] == track["score"]
        assert len(record["segmentations"]) == T
        for rle, mask in zip(record["segmentations"], track["masks"]):
            assert isinstance(rle["counts"], str) and rle["size"] == [30, 50]
            decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_empty_video_has_no_tracks():
    assert track_video(PermutingModel(), [], out_size=(h, w)) == []
