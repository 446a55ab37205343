"""AnoCLIP+ hook: test-time adaptation on the graph's ``local_tokens`` output.

The ONLY runtime module that imports torch, and only when TTA is requested (``Detector``
imports this module lazily inside ``infer_pixels(..., tta=True)``). The adaptation itself is the
core's ``anoclip_core.tta.adapt_tokens`` (same adapter, seeds and optimiser), so the runtime's
AnoCLIP+ maps equal the core's per-image mode for the same tokens.

Per image, on purpose: every image gets a fresh adapter AND a fresh AdamW, and no state is kept
between images or calls, so results do not depend on which images came before and concurrent
calls are safe. This differs from the official evaluation loop (``anoclip-eval --tta``, reference
mode), which carries one AdamW per class over the class's images in dataset order; see the
README's "AnoCLIP+ in evaluation vs. runtime" for how much the maps differ.
"""
from __future__ import annotations

import numpy as np

from anoclip_core.errors import BackendUnavailable


def adapted_patch_probs(tokens: np.ndarray, sentences: np.ndarray, prototypes: np.ndarray,
                        temperature: float = 1.0, config=None) -> np.ndarray:
    """Projected local tokens [B, h, w, D] -> AnoCLIP+ patch probabilities [B, h, w] (numpy).

    ``sentences`` [924, D] per-sentence normalised text embeddings (normal first),
    ``prototypes`` [2, D]. ``config``: an ``anoclip_core.tta.TTAConfig`` (default settings with
    the artifact's temperature).
    """
    try:
        import torch
        import torch.nn.functional as F

        from anoclip_core.tta import TTAConfig, adapt_tokens
    except ImportError as err:
        raise BackendUnavailable(
            f"--tta (AnoCLIP+) needs PyTorch (pip install anoclip[core]); import failed: {err}"
        ) from None
    cfg = config or TTAConfig(temperature=float(temperature))
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))
        protos = torch.from_numpy(np.ascontiguousarray(prototypes, dtype=np.float32))
        sents = torch.from_numpy(np.ascontiguousarray(sentences, dtype=np.float32))
    adapted = adapt_tokens(x, sents, protos, cfg)
    assert isinstance(adapted, torch.Tensor)  # (a tuple only with return_losses=True)
    with torch.no_grad():
        local = F.normalize(adapted.float(), dim=-1)
        logits = local @ protos.t() / cfg.temperature
        return logits.softmax(dim=-1)[..., 1].numpy().astype(np.float32)
