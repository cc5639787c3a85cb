"""Issue 26 numerics and DDP safety: bf16 autocast against fp32, torch.compile against eager,
every parameter gets a gradient (so DDP runs with find_unused_parameters=False)."""
import copy
import os

import pytest
import torch

from svis_ray.accel import CompiledModel, autocast, compiled_shapes
from svis_ray.losses import SetCriterion
from svis_ray.matcher import HungarianMatcher
from svis_ray.model import build_model, preprocess
from svis_ray.optim import build_optimizer, build_scheduler, train_step

K, H, W = 3, 64, 96


def batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = preprocess(torch.randint(0, 255, (n, 3, H, W), dtype=torch.uint8, generator=g), [(H, W)] * n)
    masks = torch.zeros(n, 2, H, W, dtype=torch.uint8)
    masks[:, 0, 8:40, 8:48] = 1
    masks[:, 1, 30:60, 50:90] = 1
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks[i]} for i in range(n)]
    targets[-1] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": masks[-1, :0]}  # an empty frame
    return x, targets


def criterion():
    return SetCriterion(K, HungarianMatcher(num_points=256), num_points=256)


def test_bf16_forward_agrees_with_fp32():
    """bf16 autocast (deformable sampling kept in fp32) against fp32, the stated tolerance: mean
    absolute difference under 5 % of each output's spread (measured 2-4 %), class probabilities
    within 0.05 (measured 0.03), the same foreground on 98 % of the mask pixels (measured 99.1-99.4 %).
    Single values move more (up to ~0.5 of the spread): the masked attention's mask is a threshold
    at logit 0, and a pixel near it that flips changes what a query attends to."""
    torch.manual_seed(0)
    model = build_model("tiny", K).eval()
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)
        with autocast("bf16", "cpu"):
            half = model(x)
    assert half["pred_masks"].dtype == torch.bfloat16  # autocast really ran
    for key in ("pred_logits", "pred_masks", "pred_embds"):
        err = (half[key].float() - ref[key]).abs().mean()
        assert err < 0.05 * ref[key].std(), (key, float(err), float(ref[key].std()))
    probs = (half["pred_logits"].float().softmax(-1) - ref["pred_logits"].softmax(-1)).abs().max()
    assert probs < 0.05
    agree = ((half["pred_masks"].float() > 0) == (ref["pred_masks"] > 0)).float().mean()
    assert agree > 0.98


def test_every_parameter_gets_a_gradient():
    """DDP with find_unused_parameters=False hangs or errs if a parameter gets no gradient; a
    batch with an empty frame and a frame with objects must reach all of them."""
    torch.manual_seed(0)
    model = build_model("tiny", K).train()
    x, targets = batch()
    crit = criterion()
    crit.total(crit(model(x), targets)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # All frames empty: the mask losses are 0 * sum(masks), which still reaches every parameter.
    model.zero_grad(set_to_none=True)
    empty = [{"labels": t["labels"][:0], "masks": t["masks"][:0]} for t in targets]
    crit.total(crit(model(x), empty)).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.skipif(not os.environ.get("SVIS_SLOW_TESTS"),
                    reason="torch.compile of forward + backward takes minutes on a CPU; SVIS_SLOW_TESTS=1 runs it")
def test_compiled_training_reaches_the_eager_loss():
    torch.manual_seed(0)
    eager = build_model("tiny", K).train()
    twin = copy.deepcopy(eager)
    compiled = CompiledModel(twin)
    x, targets = batch(3)
    losses = {}
    for name, model, params in (("eager", eager, eager), ("compiled", compiled, twin)):
        torch.manual_seed(1)  # the same matching and sampled points
        opt = build_optimizer(params, lr=1e-3)
        sched = build_scheduler(opt, 8)
        losses[name] = [float(train_step(model, criterion(), opt, sched, x, targets)["loss"]) for _ in range(8)]
    assert compiled_shapes(compiled) == 1
    assert losses["compiled"][-1] < losses["compiled"][0]  # it trains
    # Same loss within noise: kernel fusion reorders float sums, which can flip a matching.
    assert losses["compiled"][-1] == pytest.approx(losses["eager"][-1], rel=0.05)
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-4)


def test_teacher_batches_the_frames_of_all_clips(one_torch_thread):
    """forward_clips runs clips of one frame size together and gives each clip what a forward of
    its own frames gives (clips of other sizes in separate passes; empty clips None)."""
    import numpy as np

    from svis_ray.teacher import forward_clips, forward_frames

    torch.manual_seed(0)
    model = build_model("tiny", K).eval()
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8)
             for f, h, w in ((3, 64, 96), (2, 64, 96), (0, 64, 96), (3, 32, 64))]
    with torch.no_grad():
        got = forward_clips(model, clips, window=4, device=torch.device("cpu"))
        for clip, out in zip(clips, got):
            if not len(clip):
                assert out is None
                continue
            ref = forward_frames(model, clip, 30, torch.device("cpu"))
            for k in ref:
                torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4)
