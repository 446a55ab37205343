"""Dual-path value-to-value (V-V) visual encoder wrapping an open_clip ViT (ALGORITHM.md §2).

The wrapper reads the open_clip ``VisionTransformer``'s own modules and parameters and never
edits them: the first ``depth - K`` blocks run as open_clip runs them, the last K blocks run
both the ordinary stream ``x_ori`` and the local stream ``x_loc`` in one pass, computing q, k, v
once per block.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError, ModelError

MAX_DUAL_BLOCKS = 12


def default_dual_blocks(depth: int) -> int:
    """K = min(12, depth): all blocks of a 12-layer model, blocks 13..24 of a 24-layer one."""
    return min(MAX_DUAL_BLOCKS, depth)


def _attention_params(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear, int]:
    """(in_proj_weight, in_proj_bias, out_proj, num_heads) of an open_clip residual block."""
    attn = getattr(block, "attn", None)
    weight = getattr(attn, "in_proj_weight", None)
    out_proj = getattr(attn, "out_proj", None)
    heads = getattr(attn, "num_heads", None)
    if weight is None or out_proj is None or heads is None:
        raise ModelError(
            f"unsupported attention block {type(block).__name__}/{type(attn).__name__}: the V-V path needs "
            "in_proj_weight, out_proj and num_heads (nn.MultiheadAttention-style parameters)"
        )
    if getattr(attn, "batch_first", True) is False:
        raise ModelError("unsupported open_clip block: attention is not batch_first")
    return weight, getattr(attn, "in_proj_bias", None), out_proj, int(heads)


class DualPathEncoder(nn.Module):
    """open_clip ``VisionTransformer`` -> (global tokens [B, D], local tokens [B, h, w, D]).

    ``forward_tokens`` returns the projected tokens before normalisation (AnoCLIP+ adapts those);
    ``forward`` returns both L2-normalised.
    """

    def __init__(self, visual: nn.Module, dual_blocks: int | None = None) -> None:
        super().__init__()
        for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, name):
                raise ModelError(f"backbone is not an open_clip VisionTransformer (no '{name}'); use a ViT model")
        if getattr(visual, "attn_pool", None) is not None:
            raise ModelError("open_clip ViTs with attentional pooling (CoCa-style) are not supported")
        if getattr(visual, "pool_type", "tok") != "tok":
            raise ModelError(f"open_clip ViT pool_type {visual.pool_type!r} not supported (needs 'tok': a CLS token)")
        if visual.proj is None:
            raise ModelError("open_clip ViT has no output projection (proj is None)")
        if getattr(visual.transformer, "batch_first", True) is False:
            raise ModelError("open_clip ViT runs its transformer sequence-first; only batch_first is supported")
        blocks = visual.transformer.resblocks
        depth = len(blocks)
        k = default_dual_blocks(depth) if dual_blocks is None else int(dual_blocks)
        if not 1 <= k <= depth:
            raise ModelError(f"dual_blocks must be in [1, {depth}] for this {depth}-block backbone, got {k}")
        for block in blocks[depth - k:]:
            _attention_params(block)
        self.visual = visual
        self.depth = depth
        self.dual_blocks = k
        self.first_dual = depth - k
        patch = visual.conv1.kernel_size
        self.patch_size = (int(patch[0]), int(patch[1]))

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.visual, "image_size", None)
        if isinstance(size, (tuple, list)):
            return int(size[0]), int(size[1])
        n = int(self.visual.positional_embedding.shape[0]) - 1
        side = int(math.isqrt(n)) * self.patch_size[0]
        return side, side

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.patch_size[0], w // self.patch_size[1]

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor):
            raise InputError(f"pixels must be a torch.Tensor [B, 3, H, W], got {type(pixels).__name__}")
        h, w = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (h, w):
            raise InputError(f"pixels must have shape [B, 3, {h}, {w}] for this model, got {list(pixels.shape)}")
        if not pixels.is_floating_point():
            raise InputError(f"pixels must be a floating-point tensor (normalised image), got dtype {pixels.dtype}")

    def _dual_block(
        self, block: nn.Module, x_ori: torch.Tensor, x_loc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias, out_proj, heads = _attention_params(block)
        b, n, c = x_ori.shape
        h = block.ln_1(x_ori)
        qkv = F.linear(h, weight, bias).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a_ori = F.scaled_dot_product_attention(q, k, v)
        a_vv = F.scaled_dot_product_attention(v, v, v)
        a_ori = out_proj(a_ori.transpose(1, 2).reshape(b, n, c))
        a_vv = out_proj(a_vv.transpose(1, 2).reshape(b, n, c))
        x_ori = x_ori + block.ls_1(a_ori) if hasattr(block, "ls_1") else x_ori + a_ori
        mlp_out = block.mlp(block.ln_2(x_ori))
        x_ori = x_ori + block.ls_2(mlp_out) if hasattr(block, "ls_2") else x_ori + mlp_out
        x_loc = x_loc + a_vv
        return x_ori, x_loc

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected (unnormalised) global [B, D] and local [B, h, w, D] tokens."""
        self._check_pixels(pixels)
        visual = self.visual
        x = visual._embeds(pixels) if hasattr(visual, "_embeds") else self._embeds(pixels)
        blocks = visual.transformer.resblocks
        for block in blocks[: self.first_dual]:
            x = block(x)
        x_ori, x_loc = x, x
        for block in blocks[self.first_dual:]:
            x_ori, x_loc = self._dual_block(block, x_ori, x_loc)
        proj = visual.proj
        glob = visual.ln_post(x_ori[:, 0]) @ proj
        local = visual.ln_post(x_loc[:, 1:]) @ proj
        gh, gw = self.grid_size
        return glob, local.reshape(local.shape[0], gh, gw, local.shape[-1])

    def _embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised global [B, D] and local [B, h, w, D] embeddings."""
        glob, local = self.forward_tokens(pixels)
        return F.normalize(glob, dim=-1), F.normalize(local, dim=-1)
