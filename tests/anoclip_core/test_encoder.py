"""Dual-path V-V encoder (ALGORITHM.md §2) against open_clip and an explicit re-computation.

The reference below is written from the algorithm text, independently of ``encoder.py``: a
float64 copy of the visual tower, explicit loops over blocks and heads, q/k/v sliced out of
``in_proj_weight``/``in_proj_bias``, ``softmax(v vᵀ/√d) v`` per head, then ``out_proj``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from anoclip_core import AnoCLIP
from anoclip_core.encoder import DualPathEncoder
from anoclip_core.errors import ModelError


def _pixels(b: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _heads_attention(h: torch.Tensor, attn: torch.nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """(ordinary, V-V) attention outputs after out_proj, one head at a time."""
    c = h.shape[-1]
    heads = attn.num_heads
    d = c // heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    ori_heads, vv_heads = [], []
    for i in range(heads):
        rows_q = slice(i * d, (i + 1) * d)
        rows_k = slice(c + i * d, c + (i + 1) * d)
        rows_v = slice(2 * c + i * d, 2 * c + (i + 1) * d)
        q = h @ w[rows_q].t() + bias[rows_q]
        k = h @ w[rows_k].t() + bias[rows_k]
        v = h @ w[rows_v].t() + bias[rows_v]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        att_vv = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(d), dim=-1)
        ori_heads.append(att @ v)
        vv_heads.append(att_vv @ v)
    out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
    a_ori = torch.cat(ori_heads, dim=-1) @ out_w.t() + out_b
    a_vv = torch.cat(vv_heads, dim=-1) @ out_w.t() + out_b
    return a_ori, a_vv


def _layer_scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gamma = getattr(module, "gamma", None)
    return x if gamma is None else x * gamma


def reference_dual_path(visual: torch.nn.Module, pixels: torch.Tensor, first_dual: int):
    """Straightforward §2 in float64: (global [B, D], local [B, h, w, D]), both L2-normalised."""
    vis = copy.deepcopy(visual).double().eval()
    x = pixels.double()
    with torch.no_grad():
        feat = vis.conv1(x)  # [B, C, gh, gw]
        b, c, gh, gw = feat.shape
        tokens = feat.reshape(b, c, gh * gw).permute(0, 2, 1)
        cls = vis.class_embedding.reshape(1, 1, c).expand(b, 1, c)
        x = torch.cat([cls, tokens], dim=1) + vis.positional_embedding
        x = vis.ln_pre(x)
        x_ori = x
        x_loc = None
        for idx, block in enumerate(vis.transformer.resblocks):
            if idx == first_dual:
                x_loc = x_ori.clone()
            a_ori, a_vv = _heads_attention(block.ln_1(x_ori), block.attn)
            if x_loc is not None:
                x_loc = x_loc + a_vv  # V-V reads the ORIGINAL stream; no MLP on the local stream
            x_ori = x_ori + _layer_scale(block.ls_1, a_ori)
            x_ori = x_ori + _layer_scale(block.ls_2, block.mlp(block.ln_2(x_ori)))
        glob = vis.ln_post(x_ori[:, 0]) @ vis.proj
        local = vis.ln_post(x_loc[:, 1:]) @ vis.proj
        glob = glob / glob.norm(dim=-1, keepdim=True)
        local = local / local.norm(dim=-1, keepdim=True)
    return glob, local.reshape(b, gh, gw, -1)


def test_global_equals_open_clip_encode_image(tiny_model):
    x = _pixels(3, 64, seed=0)
    glob, _ = tiny_model.encode_image(x)
    with torch.no_grad():
        expected = tiny_model.clip.encode_image(x, normalize=True)
    assert glob.shape == expected.shape == (3, 32)
    torch.testing.assert_close(glob, expected, atol=1e-5, rtol=1e-5)


def test_global_equals_open_clip_encode_image_24_blocks(tiny24_model):
    x = _pixels(2, 32, seed=1)
    glob, _ = tiny24_model.encode_image(x)
    with torch.no_grad():
        expected = tiny24_model.clip.encode_image(x, normalize=True)
    torch.testing.assert_close(glob, expected, atol=1e-5, rtol=1e-5)


def test_local_equals_explicit_recomputation(tiny_model):
    assert tiny_model.encoder.first_dual == 0 and tiny_model.encoder.dual_blocks == 2
    x = _pixels(3, 64, seed=2)
    glob, local = tiny_model.encode_image(x)
    ref_glob, ref_local = reference_dual_path(tiny_model.clip.visual, x, first_dual=0)
    assert local.shape == (3, 8, 8, 32)
    torch.testing.assert_close(glob.double(), ref_glob, atol=1e-5, rtol=0)
    torch.testing.assert_close(local.double(), ref_local, atol=1e-5, rtol=0)
    # the images of the batch differ, and local differs from the global embedding: not a trivial match
    assert (local[0] - local[1]).abs().max() > 1e-2
    assert (local[0] - glob[0]).abs().max() > 1e-2


def test_reference_is_not_vacuous(tiny_model):
    """The re-computation distinguishes V-V from ordinary attention (q k^T) on the local stream."""
    x = _pixels(2, 64, seed=3)
    _, local = tiny_model.encode_image(x)
    visual = tiny_model.clip.visual
    with torch.no_grad():
        # local stream fed by ordinary attention instead of V-V: must NOT match
        vis = copy.deepcopy(visual).eval()
        tokens = vis.ln_pre(
            torch.cat(
                [vis.class_embedding.reshape(1, 1, -1).expand(2, 1, -1), vis.conv1(x).flatten(2).transpose(1, 2)], 1
            )
            + vis.positional_embedding
        )
        x_ori, x_loc = tokens, tokens
        for block in vis.transformer.resblocks:
            a_ori, _ = _heads_attention(block.ln_1(x_ori), block.attn)
            x_loc = x_loc + a_ori
            x_ori = x_ori + a_ori
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        wrong = vis.ln_post(x_loc[:, 1:]) @ vis.proj
        wrong = (wrong / wrong.norm(dim=-1, keepdim=True)).reshape(2, 8, 8, -1)
    assert (wrong - local).abs().max() > 1e-3


def test_24_blocks_dual_only_in_last_12(tiny24_model):
    enc = tiny24_model.encoder
    assert enc.depth == 24 and enc.dual_blocks == 12 and enc.first_dual == 12
    x = _pixels(2, 32, seed=4)
    glob, local = tiny24_model.encode_image(x)
    _, ref12 = reference_dual_path(tiny24_model.clip.visual, x, first_dual=12)
    _, ref0 = reference_dual_path(tiny24_model.clip.visual, x, first_dual=0)
    torch.testing.assert_close(local.double(), ref12, atol=1e-5, rtol=0)
    # the switch point matters: dual from block 0 gives a clearly different local output
    assert (local.double() - ref0).abs().max() > 1e-2


@pytest.mark.parametrize("k", [1, 4, 24])
def test_dual_blocks_configurable(tiny24_model, k):
    model = AnoCLIP(tiny24_model.clip, tiny24_model.backbone, tiny24_model.weights, dual_blocks=k, cache_dir=None)
    assert model.encoder.dual_blocks == k and model.encoder.first_dual == 24 - k
    x = _pixels(2, 32, seed=5)
    glob, local = model.encode_image(x)
    _, ref = reference_dual_path(tiny24_model.clip.visual, x, first_dual=24 - k)
    torch.testing.assert_close(local.double(), ref, atol=1e-5, rtol=0)
    # the original stream does not depend on the switch point
    torch.testing.assert_close(glob, tiny24_model.encode_image(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [0, -1, 25, 100])
def test_invalid_dual_blocks(tiny24_model, k):
    with pytest.raises(ModelError, match=r"dual_blocks must be in \[1, 24\]"):
        AnoCLIP(tiny24_model.clip, tiny24_model.backbone, tiny24_model.weights, dual_blocks=k, cache_dir=None)


def test_invalid_dual_blocks_via_create(register_tiny):
    with pytest.raises(ModelError, match="dual_blocks"):
        AnoCLIP.create(register_tiny, pretrained=None, dual_blocks=3, cache_dir=None)


def test_layer_scale_blocks():
    """A ViT with layer-scale (ls_1/ls_2 = LayerScale) follows the same §2 with the scales applied."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0, ls_init_value=0.5, output_dim=16
    ).eval()
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            block.ls_1.gamma.uniform_(0.2, 1.5)
            block.ls_2.gamma.uniform_(0.2, 1.5)
    enc = DualPathEncoder(visual, dual_blocks=2)
    x = _pixels(2, 32, seed=6)
    with torch.no_grad():
        glob, local = enc(x)
        expected_glob = torch.nn.functional.normalize(visual(x), dim=-1)
    torch.testing.assert_close(glob, expected_glob, atol=1e-5, rtol=1e-5)
    ref_glob, ref_local = reference_dual_path(visual, x, first_dual=1)
    torch.testing.assert_close(glob.double(), ref_glob, atol=1e-5, rtol=0)
    torch.testing.assert_close(local.double(), ref_local, atol=1e-5, rtol=0)


def test_forward_tokens_unnormalised_and_consistent(tiny_model):
    x = _pixels(2, 64, seed=7)
    g_tok, l_tok = tiny_model.encode_tokens(x)
    g, loc = tiny_model.encode_image(x)
    norms = l_tok.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    torch.testing.assert_close(torch.nn.functional.normalize(g_tok, dim=-1), g)
    torch.testing.assert_close(torch.nn.functional.normalize(l_tok, dim=-1), loc)


def test_encoder_does_not_modify_open_clip(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.clip.state_dict().items()}
    tiny_model.encode_image(_pixels(1, 64, seed=8))
    after = tiny_model.clip.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_geometry(tiny_model, tiny24_model):
    assert tiny_model.encoder.image_size == (64, 64) and tiny_model.grid_size == (8, 8)
    assert tiny_model.encoder.patch_size == (8, 8) and tiny_model.embed_dim == 32
    assert tiny24_model.encoder.image_size == (32, 32) and tiny24_model.grid_size == (4, 4)


def test_rejects_non_vit():
    with pytest.raises(ModelError, match="VisionTransformer"):
        DualPathEncoder(torch.nn.Linear(3, 3))
