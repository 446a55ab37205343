"""Fake backends for unit tests of the runtime (no ONNX graph needed)."""
from __future__ import annotations

import numpy as np

from anoclip.runtime.backends.base import check_inputs, check_outputs
from anoclip_core.transform import OPENAI_MEAN, OPENAI_STD

GRID = 8
DIM = 16


class ConstantBackend:
    """Every patch probability and image score is ``value``."""

    name = "fake-constant"

    def __init__(self, value: float = 0.3) -> None:
        self.value = float(value)
        self.calls = 0

    def run(self, pixels, prototypes, outputs=("patch_probs", "image_scores")):
        outs = check_outputs(outputs)
        px, pr = check_inputs(pixels, prototypes)
        self.calls += 1
        b, c = px.shape[0], pr.shape[0]
        full = {"patch_probs": np.full((b, c, GRID, GRID), self.value, np.float32),
                "image_scores": np.full((b, c), self.value, np.float32),
                "global_embedding": np.zeros((b, DIM), np.float32),
                "local_embeddings": np.zeros((b, GRID, GRID, DIM), np.float32),
                "local_tokens": np.zeros((b, GRID, GRID, DIM), np.float32)}
        return {k: full[k] for k in outs}

    def close(self):
        pass


class PatchMeanBackend(ConstantBackend):
    """Patch probability = mean brightness (de-normalised gray, [0, 1]) of the patch; image score = max."""

    name = "fake-patchmean"

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__(0.0)
        self.offset = offset

    def run(self, pixels, prototypes, outputs=("patch_probs", "image_scores")):
        outs = check_outputs(outputs)
        px, pr = check_inputs(pixels, prototypes)
        self.calls += 1
        mean = np.asarray(OPENAI_MEAN, np.float32)[None, :, None, None]
        std = np.asarray(OPENAI_STD, np.float32)[None, :, None, None]
        img = (px * std + mean).mean(axis=1)  # [B, S, S]
        b, s, _ = img.shape
        k = s // GRID
        probs = img.reshape(b, GRID, k, GRID, k).mean(axis=(2, 4)) + self.offset
        probs = np.clip(probs, 0, 1).astype(np.float32)
        c = pr.shape[0]
        full = {"patch_probs": np.repeat(probs[:, None], c, axis=1),
                "image_scores": np.repeat(probs.max(axis=(1, 2))[:, None], c, axis=1),
                "global_embedding": np.zeros((b, DIM), np.float32),
                "local_embeddings": np.zeros((b, GRID, GRID, DIM), np.float32),
                "local_tokens": np.zeros((b, GRID, GRID, DIM), np.float32)}
        return {k2: full[k2] for k2 in outs}


def fake_manifest(image_size: int = 64, random_weights: bool = False) -> dict:
    return {
        "format": "anoclip-artifact", "format_version": 1,
        "pretrained": {"source": "none", "sha256": None, "random_weights": random_weights},
        "image_size": image_size,
        "preprocess": {"image_size": image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
        "patch_grid": [GRID, GRID], "embed_dim": DIM, "temperature": 1.0,
        "text": {"file": "text_embeddings.npz", "classes": {"bottle": "object", "carpet": "texture"}},
        "models": {"fp32": {"file": "encoder.onnx", "precision": "fp32"}}, "default_model": "fp32",
    }


def fake_detector(backend=None, image_size: int = 64, random_weights: bool = False):
    from anoclip.runtime.detector import Detector

    rng = np.random.default_rng(0)
    protos = {c: rng.standard_normal((2, DIM)).astype(np.float32) for c in ("bottle", "carpet")}
    return Detector(backend or PatchMeanBackend(), fake_manifest(image_size, random_weights), protos)
