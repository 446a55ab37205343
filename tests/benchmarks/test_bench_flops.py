"""Analytical GFLOP accounting vs torch's FlopCounterMode on the tiny models."""
from __future__ import annotations

import pytest
import torch

from anoclip.benchmarks.flops import ViTSpec, flop_breakdown, gflops, torch_flops, vit_flops


@pytest.mark.parametrize("batch", [1, 2])
def test_dual_path_count_matches_flop_counter(tiny_model, batch):
    spec = ViTSpec.from_encoder(tiny_model.encoder)
    x = torch.randn(batch, 3, *spec.image_size)
    counted, per_op = torch_flops(lambda: tiny_model.encoder.forward_tokens(x))
    assert counted == batch * vit_flops(spec, dual_path=True)
    # attention is really counted (not silently missing from the counter)
    assert any("attention" in k for k in per_op)


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_open_clip_count_matches_flop_counter(tiny_model, batch):
    spec = ViTSpec.from_encoder(tiny_model.encoder)
    x = torch.randn(batch, 3, *spec.image_size)
    counted, _ = torch_flops(lambda: tiny_model.clip.encode_image(x))
    assert counted == batch * vit_flops(spec, dual_path=False)


def test_partial_dual_path_24_blocks(tiny24_model):
    """12 dual blocks of 24: only the last 12 carry the V-V extra attention."""
    spec = ViTSpec.from_encoder(tiny24_model.encoder)
    assert (spec.layers, spec.dual_blocks) == (24, 12)
    x = torch.randn(2, 3, *spec.image_size)
    counted, _ = torch_flops(lambda: tiny24_model.encoder.forward_tokens(x))
    assert counted == 2 * vit_flops(spec, dual_path=True)
    wrong = ViTSpec(**{**spec.__dict__, "dual_blocks": 24})
    assert counted != 2 * vit_flops(wrong, dual_path=True)


def test_spec_from_config_equals_spec_from_model(tiny_model, tiny24_model):
    assert ViTSpec.from_open_clip_config("anoclip-tiny") == ViTSpec.from_encoder(tiny_model.encoder)
    assert ViTSpec.from_open_clip_config("anoclip-tiny-24") == ViTSpec.from_encoder(tiny24_model.encoder)


def test_breakdown_by_hand_tiny():
    """anoclip-tiny: 64 px, patch 8 -> 64 patches, N = 65 tokens, width 64, MLP 256, D = 32, 2 blocks."""
    spec = ViTSpec((64, 64), (8, 8), 64, 2, 256, 32, 2)
    n, c = 65, 64
    parts = flop_breakdown(spec, dual_path=True)
    assert parts["patch_embed"] == 2 * 64 * 64 * 3 * 8 * 8
    assert parts["blocks.qkv"] == 2 * (2 * n * c * 3 * c)
    assert parts["blocks.attention"] == 2 * (4 * n * n * c)
    assert parts["blocks.out_proj"] == 2 * (2 * n * c * c)
    assert parts["blocks.mlp"] == 2 * (4 * n * c * 256)
    assert parts["vv.attention"] == 2 * (4 * n * n * c)
    assert parts["vv.out_proj"] == 2 * (2 * n * c * c)
    assert parts["head.proj"] == 2 * n * c * 32
    assert vit_flops(spec) == sum(parts.values())
    assert flop_breakdown(spec, dual_path=False)["head.proj"] == 2 * c * 32


def test_published_vit_sizes():
    """Plain image towers against the usual published multiply-add counts (fvcore-style GMACs)."""
    assert gflops(ViTSpec.from_open_clip_config("ViT-B-16"), dual_path=False) / 2 == pytest.approx(17.56, rel=2e-3)
    assert gflops(ViTSpec.from_open_clip_config("ViT-B-32"), dual_path=False) / 2 == pytest.approx(4.41, rel=2e-3)
    assert gflops(ViTSpec.from_open_clip_config("ViT-L-14"), dual_path=False) / 2 == pytest.approx(81.0, rel=2e-3)
    b16p = ViTSpec.from_open_clip_config("ViT-B-16-plus-240")
    assert (b16p.tokens, b16p.width, b16p.dual_blocks) == (226, 896, 12)
    assert gflops(b16p, dual_path=True) > gflops(b16p, dual_path=False)


def test_image_size_override_changes_the_grid():
    spec = ViTSpec.from_open_clip_config("ViT-B-16", image_size=448)
    assert spec.grid == (28, 28) and spec.tokens == 785
