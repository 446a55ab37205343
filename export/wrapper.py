"""Export-only ``nn.Module``: plain tensors in, the ARCHITECTURE.md graph outputs out.

Like segment-anything's ``SamOnnxModel``, this wrapper exists only to give the exporter a
forward with tensor inputs/outputs and fixed names; it holds no parameters of its own and reads
the core's ``DualPathEncoder`` as is (so the graph computes exactly what the core computes).

Inputs: ``pixels [B, 3, S, S]`` (normalised) and ``text_prototypes [C, 2, D]`` (L2-normalised,
normal then abnormal). Outputs, in this order (``runtime.contract.OUTPUT_NAMES``)::

    global_embedding  [B, D]        L2-normalised
    local_embeddings  [B, h, w, D]  L2-normalised
    local_tokens      [B, h, w, D]  projected tokens before normalisation (AnoCLIP+ TTA input)
    patch_probs       [B, C, h, w]  softmax([cos_n, cos_a] / T)[abnormal]
    image_scores      [B, C]        the same on the global embedding

The temperature ``T`` is baked in as a constant. The 2-way softmax's abnormal entry is computed
as ``sigmoid((cos_a - cos_n) / T)``: identical mathematically, one op instead of
Softmax+Gather, and numerically safe for any T.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AnoCLIPExportWrapper(nn.Module):
    """``(pixels, text_prototypes)`` -> ``(global_embedding, local_embeddings, local_tokens, patch_probs,
    image_scores)``."""

    def __init__(self, encoder: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.encoder = encoder
        self.temperature = float(temperature)

    def forward(self, pixels: torch.Tensor, text_prototypes: torch.Tensor):
        glob, local = self.encoder.forward_tokens(pixels)
        g = F.normalize(glob, dim=-1)
        loc = F.normalize(local, dim=-1)
        # direction (abnormal - normal): one matmul per output instead of two
        diff = text_prototypes[:, 1, :] - text_prototypes[:, 0, :]  # [C, D]
        inv_t = 1.0 / self.temperature
        patch_logit = torch.matmul(loc, diff.t()) * inv_t  # [B, h, w, C]
        patch_probs = torch.sigmoid(patch_logit).permute(0, 3, 1, 2)  # [B, C, h, w]
        image_scores = torch.sigmoid(torch.matmul(g, diff.t()) * inv_t)  # [B, C]
        return g, loc, local, patch_probs, image_scores
