import json
from pathlib import Path

import pytest
import torch

from svis_ray.errors import SvisError
from svis_ray.model import PRESETS, MinVIS, build_model, preprocess, preprocess_frames
from svis_ray.model.minvis import PIXEL_MEAN, PIXEL_STD
from svis_ray.model.pixel_decoder import MSDeformAttn, ms_deform_attn

REFERENCE = Path(__file__).parent / "data" / "mask2former_r50_coco_instance.pkl_keys.json"  # copy of shared/reference


def _reference_param_count(num_classes: int) -> int:
    """Parameters of the reference checkpoint: detectron2's FrozenBN tensors and the criterion are buffers."""
    shapes = json.loads(REFERENCE.read_text())
    total = 0
    for name, shape in shapes.items():
        if name.startswith("criterion.") or (name.startswith("backbone.") and ".norm." in name):
            continue
        n = torch.Size(shape).numel()
        if "class_embed" in name:  # 81-way COCO head -> num_classes + 1
            n = n // 81 * (num_classes + 1)
        total += n
    return total


def test_tiny_output_shapes():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=5)
    cfg = model.config
    out = model(torch.rand(2, 3, 64, 96) * 255)
    assert out["pred_logits"].shape == (2, cfg.num_queries, 6)
    assert out["pred_masks"].shape == (2, cfg.num_queries, 16, 24)
    assert out["pred_embds"].shape == (2, cfg.num_queries, cfg.hidden_dim)
    assert len(out["aux_outputs"]) == cfg.dec_layers == 3
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    # the initial (query-only) prediction is the same for every image: no image information yet
    first = out["aux_outputs"][0]["pred_logits"]
    assert torch.allclose(first[0], first[1]) and not torch.allclose(out["pred_logits"][0], out["pred_logits"][1])


def test_tiny_backward_gives_finite_grads_everywhere():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    out = model(preprocess(torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), [(96, 128), (80, 100)]))
    preds = [out] + out["aux_outputs"]
    loss = sum(p["pred_logits"].square().mean() + p["pred_masks"].square().mean() for p in preds)
    (loss + out["pred_embds"].square().mean()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # tiny: freeze_at=0
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.sem_seg_head["pixel_decoder"].transformer.encoder["layers"][0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_preprocess_normalises_then_pads_with_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (3, 64, 70), dtype=torch.uint8, generator=g)
    x = preprocess_frames([a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 64, 96)
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :40, :50], (a.float() - mean) / std)
    torch.testing.assert_close(x[1, :, :, :70], (b.float() - mean) / std)
    assert not x[0, :, 40:].any() and not x[0, :, :, 50:].any() and not x[1, :, :, 70:].any()
    padded = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    padded[0, :, :40, :50], padded[1, :, :, :70] = a, b
    assert torch.equal(preprocess(padded, [(40, 50), (64, 70)]), x)  # the padded-batch form agrees
    assert MinVIS.preprocess is preprocess


def test_forward_takes_preprocessed_float_input_only():
    model = build_model("tiny", num_classes=2).eval()
    with pytest.raises(TypeError, match="preprocess"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert "pixel_mean" not in model.state_dict()  # the constants live in the module, not in the weights


def _reference_deform_attn(value, shapes, locations, weights):
    """Explicit bilinear sampling (pixel centres at (i + 0.5) / size, zeros outside), level by level."""
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].reshape(B, h, w, M, D)
        start += h * w
        x = locations[..., lvl, :, 0] * w - 0.5  # [B, Q, M, P]
        y = locations[..., lvl, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                bi = torch.arange(B)[:, None, None, None].expand_as(x)
                mi = torch.arange(M)[None, None, :, None].expand_as(x)
                sampled = v[bi, yi.clamp(0, h - 1).long(), xi.clamp(0, w - 1).long(), mi]  # [B, Q, M, P, D]
                coef = corner_w * inside * weights[..., lvl, :]
                out += (sampled * coef[..., None]).sum(3)
    return out.reshape(B, Q, M * D)


def test_ms_deform_attn_matches_explicit_bilinear_reference():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    B, Q, M, D, P = 2, 6, 2, 3, 4
    value = torch.randn(B, sum(h * w for h, w in shapes), M, D, dtype=torch.float64)
    locations = torch.rand(B, Q, M, len(shapes), P, 2, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(B, Q, M, len(shapes), P, dtype=torch.float64)
    got = ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(got, _reference_deform_attn(value, shapes, locations, weights))


def test_ms_deform_attn_offsets_are_in_pixels_of_each_level():
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=4, n_levels=2, n_heads=1, n_points=1)
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))  # level 0: +1 px in x; level 1: +1 px in y
        attn.attention_weights.weight.zero_()
    torch.manual_seed(0)
    value = torch.randn(1, 24 + 6, 4)
    v0, v1 = value[0, :24].view(4, 6, 4), value[0, 24:].view(2, 3, 4)
    # the centre of pixel (row 0, col 1) of level 1 is at pixel (x 2.5, y 0.5) of level 0
    ref = torch.tensor([0.5, 0.25]).expand(1, 1, 2, 2)
    expected = {0: v0[0:2, 3:5].mean((0, 1)),  # (3.5, 0.5): halfway between four pixels
                1: v1[1, 1]}
    for level, target in expected.items():
        with torch.no_grad():  # put (almost) all attention on one level
            attn.attention_weights.bias.copy_(torch.tensor([50.0, -50.0] if level == 0 else [-50.0, 50.0]))
        out = attn(torch.zeros(1, 1, 4), ref, value, shapes)
        torch.testing.assert_close(out[0, 0], target)


def test_deformable_init_points_spread_around_reference():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    assert torch.equal(bias[0, :, :, 0], torch.tensor([1.0, 2, 3, 4]).expand(3, 4))  # head 0 looks right
    assert torch.equal(bias[0, :, :, 1], torch.zeros(3, 4))
    assert torch.allclose(bias[2, 1, :, 1], torch.tensor([1.0, 2, 3, 4]))  # head 2 looks down
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()


def test_masked_attention_blocks_background_and_unblocks_empty_masks():
    model = build_model("tiny", num_classes=2)
    predictor = model.sem_seg_head["predictor"]
    with torch.no_grad():  # every query's mask = the sum of the mask-feature channels
        last = predictor.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)
    Q, C = predictor.query_feat.weight.shape
    mask_features = -torch.ones(2, 64, 8, 8)
    mask_features[0, :, :4, :4] = 1.0  # image 0: foreground in the top-left quadrant; image 1: empty
    _, masks, blocked = predictor._predict(torch.randn(2, Q, C), mask_features, (4, 4))
    assert blocked.shape == (2 * predictor.nheads, Q, 16)
    expected0 = torch.ones(4, 4, dtype=torch.bool)
    expected0[:2, :2] = False
    assert torch.equal(blocked[0, 0], expected0.flatten())
    assert not blocked[predictor.nheads:].any()  # fully-masked rows attend everywhere


def test_build_model_options_and_errors():
    model = build_model("tiny", num_classes=4, num_queries=7)
    assert model.config.num_queries == 7 and model.config.num_classes == 4
    assert model(torch.zeros(1, 3, 64, 64))["pred_logits"].shape == (1, 7, 5)
    with pytest.raises(SvisError, match="unknown model preset 'r101'"):
        build_model("r101", 4)
    with pytest.raises(SvisError, match="unknown model option.*num_querys"):
        build_model("tiny", 4, num_querys=7)
    with pytest.raises(SvisError, match="backbone must be one of"):
        build_model("tiny", 4, backbone="vgg16")
    with pytest.raises(SvisError, match="nheads"):
        build_model(PRESETS["tiny"], 4, nheads=3)


def test_minvis_r50_forward_backward_and_size():
    torch.manual_seed(0)
    model = build_model("minvis_r50", num_classes=80)
    n = sum(p.numel() for p in model.parameters())
    ref = _reference_param_count(80)
    print(f"minvis_r50 (80 classes): {n:,} parameters; reference {ref:,}")
    assert ref == 43_970_257
    assert abs(n - ref) <= 0.02 * ref
    assert model.config.freeze_at == 0  # MinVIS/Mask2Former FREEZE_AT 0: every conv trains ...
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in model.backbone.bn1.parameters())  # ... batch norm stays frozen
    assert build_model("minvis_r50", 80, freeze_at=2).backbone.layer1[0].conv1.weight.requires_grad is False

    out = model(torch.rand(1, 3, 360, 640) * 255)
    assert out["pred_logits"].shape == (1, 100, 81)
    assert out["pred_masks"].shape == (1, 100, 90, 160)
    assert len(out["aux_outputs"]) == 9
    out["pred_masks"].mean().backward()
    assert torch.isfinite(model.backbone.layer4[0].conv1.weight.grad).all()
    assert torch.isfinite(model.backbone.conv1.weight.grad).all()
