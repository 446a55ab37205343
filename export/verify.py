"""Verification: every exported graph, run in ONNX Runtime, against the PyTorch core.

Input set: ``VERIFY_IMAGES`` seeded random RGB images in [0, 1] (numpy ``default_rng(seed)``),
normalised with the model's own mean/std, run at batch sizes 1 (the first image) and 3 (all).
The reference is the core itself: ``model.predict(pixels, class)`` for maps [B, S, S] and
scores [B] of every class, ``model.encoder`` for embeddings and the unnormalised local tokens.
The graph's ``patch_probs`` are turned into maps with the core's own
``anoclip_core.scores.smooth_and_upsample``, so only the graph is under test.

Tolerances (max abs, for temperature T = 1; divided by T for T < 1 since |d sigmoid(x/T)/dx| <= 1/(4T)):

=========  ======  ======  =========  =====================================================
precision  map     score   embedding  why
=========  ======  ======  =========  =====================================================
fp32       1e-4    1e-4    1e-4       same arithmetic, different kernels: measured ~1e-6
fp16       1e-2    1e-2    2e-2       unit roundoff 4.9e-4; ~10-50 roundings accumulate
                                      along 12-24 residual blocks -> ~1e-2 relative worst
                                      case on unit-norm embeddings; a probability moves at
                                      most 1/4 of the cosine-difference error (sigmoid
                                      slope), and cos errors are <= 2x embedding error
bf16       5e-2    5e-2    1e-1       unit roundoff 3.9e-3 (8x fp16): same argument x5
int8       5e-2    5e-2    1.5e-1     dynamic int8 weights (per-tensor scale) + uint8
                                      activations in every Linear: ~1% relative error per
                                      matmul, attention/LayerNorm/Softmax stay fp32
=========  ======  ======  =========  =====================================================

"embedding" gates the L2-normalised global and local embeddings (max abs) and the local
tokens relative to their largest magnitude. Reduced precisions also record the same figures
against the fp32 ONNX graph (``vs_fp32``), which isolates the precision loss from export error.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from anoclip.runtime.contract import INPUT_NAMES, OUTPUT_NAMES
from anoclip_core.compare import compare as compare_maps
from anoclip_core.compare import diff
from anoclip_core.errors import AnoCLIPError

VERIFY_SEED = 0
VERIFY_IMAGES = 3
BATCH_SIZES = (1, 3)
# An export without classes verifies its graphs with this class's prompts (not stored in the artifact).
VERIFY_PROBE_CLASS = "object"

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"map": 1e-4, "score": 1e-4, "embedding": 1e-4},
    "fp16": {"map": 1e-2, "score": 1e-2, "embedding": 2e-2},
    "bf16": {"map": 5e-2, "score": 5e-2, "embedding": 1e-1},
    "int8": {"map": 5e-2, "score": 5e-2, "embedding": 1.5e-1},
}


class VerificationError(AnoCLIPError):
    """An exported graph disagrees with the PyTorch core beyond its precision's tolerance."""


def tolerance_for(precision: str, temperature: float = 1.0) -> dict[str, float]:
    base = TOLERANCES[precision]
    scale = max(1.0, 1.0 / float(temperature))
    return {"map": base["map"] * scale, "score": base["score"] * scale, "embedding": base["embedding"]}


def make_pixels(preprocess: Mapping, n: int = VERIFY_IMAGES, seed: int = VERIFY_SEED) -> np.ndarray:
    """``n`` seeded random RGB images in [0, 1], normalised -> float32 [n, 3, S, S]."""
    s = int(preprocess["image_size"])
    rng = np.random.default_rng(seed)
    rgb = rng.random((n, s, s, 3), dtype=np.float64)
    mean = np.asarray(preprocess["mean"], dtype=np.float64)
    std = np.asarray(preprocess["std"], dtype=np.float64)
    return ((rgb - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)


def reference_outputs(
    model, pixels: np.ndarray, classes: Sequence[str], domains: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """The core's outputs for ``pixels``: maps [B, C, S, S], scores [B, C], embeddings, tokens."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(pixels)
    with torch.no_grad():
        glob, local = model.encoder.forward_tokens(x)
        maps, scores = [], []
        for name in classes:
            m, s = model.predict(x, name, domain=domains.get(name))
            maps.append(m)
            scores.append(s)
    return {
        "global_embedding": F.normalize(glob, dim=-1).numpy(),
        "local_embeddings": F.normalize(local, dim=-1).numpy(),
        "local_tokens": local.numpy(),
        "maps": torch.stack(maps, 1).numpy(),
        "image_scores": torch.stack(scores, 1).numpy(),
    }


def graph_maps(patch_probs: np.ndarray, image_size: int) -> np.ndarray:
    """Graph ``patch_probs`` [B, C, h, w] -> maps [B, C, S, S] with the core's post-processing."""
    import torch

    from anoclip_core.scores import smooth_and_upsample

    b, c, h, w = patch_probs.shape
    flat = torch.from_numpy(np.ascontiguousarray(patch_probs, dtype=np.float32)).reshape(b * c, h, w)
    return smooth_and_upsample(flat, (image_size, image_size)).reshape(b, c, image_size, image_size).numpy()


def ort_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(session, pixels: np.ndarray, prototypes: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    values = session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: pixels, INPUT_NAMES[1]: prototypes})
    out = {name: np.asarray(v, dtype=np.float32) for name, v in zip(OUTPUT_NAMES, values, strict=True)}
    out["maps"] = graph_maps(out["patch_probs"], image_size)
    return out


def compare(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Error figures of one output set against a reference set."""
    tok_scale = float(np.max(np.abs(ref["local_tokens"]))) or 1.0
    maps = diff(got["maps"], ref["maps"])
    s = ref["maps"].shape[-1]
    agreement = compare_maps(got["maps"].reshape(-1, s, s), got["image_scores"], ref["maps"].reshape(-1, s, s),
                        ref["image_scores"])
    return {
        "map_pearson_min": agreement["pearson"]["worst"],
        "map_top_iou_min": agreement["top_iou"]["worst"],
        "map_max_abs": maps.max_abs,
        "map_mean_abs": maps.mean_abs,
        "score_max_abs": diff(got["image_scores"], ref["image_scores"]).max_abs,
        "embedding_max_abs": max(
            diff(got["global_embedding"], ref["global_embedding"]).max_abs,
            diff(got["local_embeddings"], ref["local_embeddings"]).max_abs,
        ),
        "tokens_max_rel": diff(got["local_tokens"], ref["local_tokens"]).max_abs / tok_scale,
    }


def _worst(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: (min if k.endswith("_min") else max)(r[k] for r in rows) for k in keys}


def _finite(outputs: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in outputs.values())


class Verifier:
    """Holds the seeded inputs and the core's reference outputs (computed once per export)."""

    def __init__(self, model, classes: Sequence[str], domains: Mapping[str, str], prototypes: np.ndarray,
                 seed: int = VERIFY_SEED, batch_sizes: Sequence[int] = BATCH_SIZES) -> None:
        self.model = model
        self.classes = list(classes)
        self.domains = dict(domains)
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.image_size = int(model.image_size)
        self.batch_sizes = tuple(batch_sizes)
        self.seed = seed
        self.pixels = make_pixels(model.preprocess_config.to_dict(), max(self.batch_sizes), seed)
        self.temperature = float(model.temperature)
        self._reference: dict[int, dict[str, np.ndarray]] = {}
        self.fp32_outputs: dict[int, dict[str, np.ndarray]] | None = None

    def reference(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self._reference:
            self._reference[batch] = reference_outputs(self.model, self.pixels[:batch], self.classes, self.domains)
        return self._reference[batch]

    def verify(self, path: str | os.PathLike, precision: str, progress=None) -> dict:
        """Run the graph at each batch size; returns the manifest ``verification`` dict or raises."""
        session = ort_session(path)
        rows, rows32, outputs = [], [], {}
        for b in self.batch_sizes:
            got = run_graph(session, self.pixels[:b], self.prototypes, self.image_size)
            if not _finite(got):
                raise VerificationError(f"{precision} graph {os.path.basename(path)} produced NaN/Inf at batch {b}")
            outputs[b] = got
            rows.append(compare(got, self.reference(b)))
            if self.fp32_outputs is not None and precision != "fp32":
                rows32.append(compare(got, self.fp32_outputs[b]))
            if progress is not None:
                progress.update(1)
        del session
        worst = _worst(rows)
        tol = tolerance_for(precision, self.temperature)
        result = {
            "inputs": int(self.pixels.shape[0]),
            "seed": self.seed,
            "batch_sizes": list(self.batch_sizes),
            "classes": len(self.classes),
            **worst,
            "tolerance": tol,
        }
        if rows32:
            result["vs_fp32"] = _worst(rows32)
        checks = (
            ("map_max_abs", "map"),
            ("score_max_abs", "score"),
            ("embedding_max_abs", "embedding"),
            ("tokens_max_rel", "embedding"),
        )
        failed = [(m, worst[m], tol[t]) for m, t in checks if not worst[m] <= tol[t]]
        result["passed"] = not failed
        if failed:
            detail = "; ".join(f"{m} = {v:.3g} > {t:.3g}" for m, v, t in failed)
            raise VerificationError(
                f"verification failed for the {precision} graph {os.path.basename(path)} against the PyTorch core: "
                f"{detail}; nothing was written"
            )
        if precision == "fp32":
            self.fp32_outputs = outputs
        return result
