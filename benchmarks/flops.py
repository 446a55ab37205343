"""Analytical FLOP count of an open_clip ViT, plain and with AnoCLIP's V-V dual path.

One multiply-add = 2 FLOPs. Counted: the patch-embedding convolution, per block the qkv
projection, the two attention matmuls (q kᵀ and attn·v), the output projection and the MLP;
for each dual block the extra V-V attention (v vᵀ, attn·v) and its output projection; finally
``ln_post(x) @ proj`` for the CLS token (plain) or CLS + all patch tokens (dual path). Not
counted (as a FLOP counter does not count them either): layer norms, softmax, GELU, bias adds,
residual adds, the tiny score head. ``torch_flops`` cross-checks the count with
``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ViTSpec:
    """What the FLOP count needs from a ViT: sizes of the patch grid, the blocks and the head."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    width: int
    layers: int
    mlp_hidden: int
    embed_dim: int
    dual_blocks: int
    in_channels: int = 3

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def tokens(self) -> int:
        return self.patches + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["tokens"] = self.tokens
        return d

    @classmethod
    def from_encoder(cls, encoder: Any) -> ViTSpec:
        """Read the sizes from an ``anoclip_core.encoder.DualPathEncoder`` (its open_clip modules)."""
        visual = encoder.visual
        block = visual.transformer.resblocks[0]
        return cls(
            image_size=tuple(encoder.image_size),
            patch_size=tuple(encoder.patch_size),
            width=int(visual.conv1.out_channels),
            layers=int(encoder.depth),
            mlp_hidden=int(block.mlp.c_fc.out_features),
            embed_dim=int(encoder.embed_dim),
            dual_blocks=int(encoder.dual_blocks),
            in_channels=int(visual.conv1.in_channels),
        )

    @classmethod
    def from_open_clip_config(
        cls, model_name: str, image_size: int | None = None, dual_blocks: int | None = None
    ) -> ViTSpec:
        """Read the sizes from open_clip's JSON config of ``model_name`` (no model is built)."""
        import open_clip

        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"no open_clip config for {model_name!r}")
        v = cfg["vision_cfg"]
        size = image_size or v["image_size"]
        size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        patch = v["patch_size"]
        patch = tuple(patch) if isinstance(patch, (list, tuple)) else (int(patch), int(patch))
        width = int(v.get("width", 768))
        layers = int(v["layers"])
        mlp_ratio = float(v.get("mlp_ratio", 4.0))
        k = min(12, layers) if dual_blocks is None else int(dual_blocks)
        return cls(size, patch, width, layers, int(width * mlp_ratio), int(cfg["embed_dim"]), k)


def _block_flops(n: int, c: int, hidden: int) -> dict[str, int]:
    return {
        "qkv": 2 * n * c * 3 * c,
        "attention": 2 * (2 * n * n * c),  # q kᵀ and attn·v, summed over heads
        "out_proj": 2 * n * c * c,
        "mlp": 2 * (2 * n * c * hidden),
    }


def flop_breakdown(spec: ViTSpec, dual_path: bool = True) -> dict[str, int]:
    """FLOPs of one image, by part. ``dual_path=False``: plain open_clip ``encode_image``."""
    n, c = spec.tokens, spec.width
    kh, kw = spec.patch_size
    parts = {"patch_embed": 2 * spec.patches * c * spec.in_channels * kh * kw}
    per_block = _block_flops(n, c, spec.mlp_hidden)
    for name, value in per_block.items():
        parts[f"blocks.{name}"] = value * spec.layers
    if dual_path:
        parts["vv.attention"] = 2 * (2 * n * n * c) * spec.dual_blocks
        parts["vv.out_proj"] = 2 * n * c * c * spec.dual_blocks
        parts["head.proj"] = 2 * n * c * spec.embed_dim  # CLS + every patch token
    else:
        parts["head.proj"] = 2 * c * spec.embed_dim  # CLS only
    return parts


def vit_flops(spec: ViTSpec, dual_path: bool = True) -> int:
    """Total FLOPs of one image through the visual tower."""
    return int(sum(flop_breakdown(spec, dual_path).values()))


def gflops(spec: ViTSpec, dual_path: bool = True) -> float:
    return vit_flops(spec, dual_path) / 1e9


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode knows the CUDA SDPA kernels; add the CPU flash kernel with the same formula."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        mapping[op] = cpu_flash
    return mapping


def torch_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Count FLOPs of ``fn()`` with ``FlopCounterMode`` -> (total, per-op counts).

    Runs with autograd enabled so that ``nn.MultiheadAttention`` takes its composite path (its
    inference fast path is one fused op that the counter cannot see) and maps the CPU flash
    attention kernel to the counter's SDPA formula.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    with torch.enable_grad(), counter:
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op
