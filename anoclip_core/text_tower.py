"""Text tower forward cut to the tokens that matter (exact under a causal mask).

open_clip's ``CLIP.encode_text`` always runs the full 77-token context, although a prompt such as
"a cropped industrial photo of the flawless bottle" is about 12 tokens long. The pooled output is
the final-LayerNorm feature at one position (the EOT token for ``argmax`` pooling, the EOS token
for ``eos`` pooling). Under a causal attention mask, position ``i`` attends to positions ``<= i``
only, and LayerNorm, the MLP and the projection act per position, so the pooled feature does not
depend on anything after the pooled position. Running positions ``0 .. L-1`` with
``L = 1 + max(pooled position over the batch)`` gives the same embedding (up to float rounding
of the shorter matrix products) at about ``(L / 77)`` of the cost.

The shortcut is taken only when all of that holds (an open_clip ``CLIP`` text tower with a causal
``attn_mask``, absolute positional embeddings and ``argmax``/``eos`` pooling). Any other text
tower (no causal mask, e.g. SigLIP; ``first``/``last`` pooling; an HF text model) goes through
the full ``encode_text``.
"""
from __future__ import annotations

import torch
from torch import nn


def _causal(mask: torch.Tensor | None, n_ctx: int) -> bool:
    """Is ``mask`` an additive causal mask (``-inf`` strictly above the diagonal, 0 elsewhere)?"""
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (n_ctx, n_ctx):
        return False
    upper = torch.triu(torch.ones(n_ctx, n_ctx, dtype=torch.bool, device=mask.device), diagonal=1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def can_truncate(clip: nn.Module) -> bool:
    """True when the text tower's pooled output is provably independent of later positions."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(clip, name) for name in needed):
        return False
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        return False
    if pool == "eos" and getattr(clip, "text_eos_id", None) is None:
        return False
    pos = clip.positional_embedding
    return isinstance(pos, torch.Tensor) and pos.dim() == 2 and _causal(getattr(clip, "attn_mask", None), pos.shape[0])


def pooled_positions(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the pooled token of each sequence, as open_clip's ``text_global_pool`` picks it."""
    if getattr(clip, "text_pool_type", "argmax") == "eos":
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def encode_text_truncated(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text(tokens)`` (unnormalised), running only the first ``L`` positions when exact."""
    if not can_truncate(clip):
        return clip.encode_text(tokens)
    pos = pooled_positions(clip, tokens)
    length = int(pos.max().item()) + 1
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pos]
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
