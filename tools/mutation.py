"""Mutation testing: plant documented bugs in a temporary copy of the repo and report survivors.

Each mutant is one exact text substitution in a module that defines the method's numbers
(scores, post-processing, export wrapper, export verification, calibration, manifest checks,
tiler). For every mutant the script copies the repository once into a temporary folder (the
working tree is never modified), applies the substitution there, runs the mutant's targeted
test subset with that copy first on ``PYTHONPATH`` and records whether any test failed
("killed") or all passed ("SURVIVED"). A mutant whose text no longer occurs exactly once is
reported as ``stale`` (update the list when the code changes).

Usage (from the repo root; see docs/TESTING.md)::

    python tools/mutation.py              # all mutants
    python tools/mutation.py --list       # the list, no runs
    python tools/mutation.py wrapper-inv-t calib-pixel-q   # selected ids

Left out on purpose (equivalent mutants, no test can kill them): dropping the tiler's division by
the weight sum (the raised-cosine ramps already sum to 1 at every sample).

Exit status: 0 when every mutant is killed, 1 when some survive or are stale.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCORES_TESTS = ("tests/anoclip_core/test_scores.py", "tests/anoclip_core/test_scores_pinned.py")
WRAPPER_TESTS = ("tests/export/test_graph_checks.py", "tests/export/test_export.py")
VERIFY_TESTS = ("tests/export/test_graph_checks.py", "tests/export/test_export.py")
CALIB_TESTS = ("tests/runtime/test_calibration_values.py", "tests/runtime/test_runtime_detector.py")
MANIFEST_TESTS = ("tests/runtime/test_artifact_integrity.py", "tests/runtime/test_contract.py")
TILER_TESTS = ("tests/runtime/test_tiler_blend.py", "tests/runtime/test_runtime_tiler.py")
POST_TESTS = ("tests/runtime/test_runtime_postprocess.py",)
TTA_TESTS = ("tests/runtime/test_tta_pinned.py", "tests/anoclip_core/test_tta.py")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    doc: str


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "scores-temp-mul",
        "anoclip_core/scores.py",
        "t() / temperature",
        "t() * temperature",
        SCORES_TESTS,
        "state_probs multiplies by T instead of dividing",
    ),
    Mutant(
        "scores-normal-idx",
        "anoclip_core/scores.py",
        "return logits.softmax(dim=-1)[..., 1]",
        "return logits.softmax(dim=-1)[..., 0]",
        SCORES_TESTS,
        "state_probs returns the NORMAL probability",
    ),
    Mutant(
        "scores-pad-zero",
        "anoclip_core/scores.py",
        'mode="replicate"',
        'mode="constant"',
        SCORES_TESTS,
        "zero padding instead of replicate padding before the 3x3 mean",
    ),
    Mutant(
        "scores-align-false",
        "anoclip_core/scores.py",
        'mode="bilinear", align_corners=True)[:, 0]',
        'mode="bilinear", align_corners=False)[:, 0]',
        SCORES_TESTS,
        "upsampling with align_corners=False",
    ),
    Mutant(
        "wrapper-inv-t",
        "export/wrapper.py",
        "inv_t = 1.0 / self.temperature",
        "inv_t = 1.0",
        WRAPPER_TESTS,
        "the exported graph ignores the temperature (issue 15 mutant 1)",
    ),
    Mutant(
        "wrapper-swap-protos",
        "export/wrapper.py",
        "diff = text_prototypes[:, 1, :] - text_prototypes[:, 0, :]",
        "diff = text_prototypes[:, 0, :] - text_prototypes[:, 1, :]",
        WRAPPER_TESTS,
        "normal/abnormal prototypes swapped in the graph",
    ),
    Mutant(
        "wrapper-tokens-normalised",
        "export/wrapper.py",
        "return g, loc, local, patch_probs",
        "return g, loc, loc, patch_probs",
        WRAPPER_TESTS,
        "local_tokens output is the normalised embedding",
    ),
    Mutant(
        "wrapper-score-no-t",
        "export/wrapper.py",
        "torch.matmul(g, diff.t()) * inv_t",
        "torch.matmul(g, diff.t())",
        WRAPPER_TESTS,
        "image score ignores the temperature",
    ),
    Mutant(
        "verify-drop-map",
        "export/verify.py",
        '("map_max_abs", "map"),',
        "",
        VERIFY_TESTS,
        "verification drops the map check (issue 15 mutant 4)",
    ),
    Mutant(
        "verify-drop-score",
        "export/verify.py",
        '("score_max_abs", "score"),',
        "",
        VERIFY_TESTS,
        "verification drops the score check",
    ),
    Mutant(
        "verify-drop-embedding",
        "export/verify.py",
        '("embedding_max_abs", "embedding"),',
        "",
        VERIFY_TESTS,
        "verification drops the embedding check",
    ),
    Mutant(
        "verify-drop-tokens",
        "export/verify.py",
        '("tokens_max_rel", "embedding"),',
        "",
        VERIFY_TESTS,
        "verification drops the local-token check",
    ),
    Mutant(
        "verify-no-t-scale",
        "export/verify.py",
        "scale = max(1.0, 1.0 / float(temperature))",
        "scale = 1.0 / float(temperature)",
        VERIFY_TESTS,
        "tolerance scale for T > 1 shrinks below the base tolerance",
    ),
    Mutant(
        "calib-pixel-q",
        "runtime/calibration.py",
        "allpix.astype(np.float64), quantile)",
        "allpix.astype(np.float64), 1.0 - quantile)",
        CALIB_TESTS,
        "pixel threshold at quantile 1-q (issue 15 mutant 3)",
    ),
    Mutant(
        "calib-image-q",
        "runtime/calibration.py",
        "np.asarray(scores, np.float64), quantile)",
        "np.asarray(scores, np.float64), 1.0 - quantile)",
        CALIB_TESTS,
        "image threshold at quantile 1-q",
    ),
    Mutant(
        "calib-image-max",
        "runtime/calibration.py",
        "float(np.quantile(np.asarray(scores, np.float64), quantile))",
        "float(np.max(scores))",
        CALIB_TESTS,
        "image threshold is the max good score whatever q",
    ),
    Mutant(
        "manifest-skip-external",
        "runtime/contract.py",
        'names += list(entry.get("external_data") or [])',
        "pass",
        MANIFEST_TESTS,
        "external-data files not referenced (issue 15 mutant 2, variant a)",
    ),
    Mutant(
        "manifest-skip-data-hash",
        "runtime/contract.py",
        "if sha256_file(path) != files[name]:",
        'if not name.endswith(".data") and sha256_file(path) != files[name]:',
        MANIFEST_TESTS,
        "sha256 check skips *.onnx.data (issue 15 mutant 2)",
    ),
    Mutant(
        "manifest-no-hash",
        "runtime/contract.py",
        "if sha256_file(path) != files[name]:",
        "if False:",
        MANIFEST_TESTS,
        "no sha256 comparison at all",
    ),
    Mutant(
        "tiler-ramp-reversed",
        "runtime/tiler.py",
        "w[up_at:up_at + overlap] = r",
        "w[up_at:up_at + overlap] = r[::-1]",
        TILER_TESTS,
        "blend ramp of the incoming tile reversed",
    ),
    Mutant(
        "tiler-score-mean",
        "runtime/tiler.py",
        "float(ts.max())",
        "float(ts.mean())",
        TILER_TESTS,
        "tiled image score is the mean of the tiles instead of the max",
    ),
    Mutant(
        "post-box-8",
        "runtime/postprocess.py",
        "return acc / np.float32(9.0)",
        "return acc / np.float32(8.0)",
        POST_TESTS,
        "3x3 mean divides by 8",
    ),
    Mutant(
        "post-pad-zero",
        "runtime/postprocess.py",
        'q = np.pad(p, pad, mode="edge")',
        'q = np.pad(p, pad)',
        POST_TESTS,
        "zero padding instead of edge padding",
    ),
    Mutant(
        "post-lam-flip",
        "runtime/postprocess.py",
        "o += cols[y1] * ly",
        "o += cols[y1] * (1.0 - ly)",
        POST_TESTS,
        "row blend uses the wrong tap weight",
    ),
    Mutant(
        "tta-lr",
        "anoclip_core/tta.py",
        "lr: float = 1e-3",
        "lr: float = 2e-3",
        TTA_TESTS,
        "TTA learning rate default 2e-3 instead of 1e-3",
    ),
    Mutant(
        "tta-wd",
        "anoclip_core/tta.py",
        "weight_decay: float = 0.01",
        "weight_decay: float = 0.0",
        TTA_TESTS,
        "TTA without weight decay",
    ),
    Mutant(
        "tta-noise",
        "anoclip_core/tta.py",
        "noise_std: float = 0.055",
        "noise_std: float = 0.05",
        TTA_TESTS,
        "TTA noise std 0.05 instead of 0.055",
    ),
    Mutant(
        "detector-tta-t",
        "runtime/detector.py",
        "self.prototypes(class_name)[0], self.temperature)",
        "self.prototypes(class_name)[0])",
        WRAPPER_TESTS,
        "the detector's TTA ignores the manifest temperature",
    ),
    Mutant(
        "tta-runtime-t",
        "runtime/tta.py",
        "cfg = config or TTAConfig(temperature=float(temperature))",
        "cfg = config or TTAConfig()",
        TTA_TESTS,
        "runtime TTA ignores the artifact's temperature",
    ),
)


def copy_repo(dst: Path) -> None:
    """Copy the working tree (no .git, caches or build outputs) to ``dst``."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "build", "dist", "*.egg-info",
                                    ".venv", "node_modules")
    shutil.copytree(ROOT, dst, ignore=ignore)


def run_mutant(m: Mutant, copy: Path, timeout: int) -> tuple[str, float]:
    """Apply ``m`` to the copy, run its tests, restore the file; returns (status, seconds)."""
    target = copy / m.file
    original = target.read_text()
    if original.count(m.old) != 1:
        return "stale", 0.0
    tests = [t for t in m.tests if (copy / t.split("::")[0]).exists()]
    if not tests:
        return "no-tests", 0.0
    target.write_text(original.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        status = "killed" if proc.returncode != 0 else "SURVIVED"
        if proc.returncode not in (0, 1):
            status = f"killed(rc={proc.returncode})"
    except subprocess.TimeoutExpired:
        status = "killed(timeout)"
    finally:
        target.write_text(original)
    return status, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.ids or m.id in args.ids]
    unknown = set(args.ids) - {m.id for m in MUTANTS}
    if unknown:
        print(f"error: unknown mutant id(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id:28s} {m.file:28s} {m.doc}")
        return 0
    with tempfile.TemporaryDirectory(prefix="anoclip-mut-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(copy)
        results = []
        for m in chosen:
            status, secs = run_mutant(m, copy, args.timeout)
            results.append((m, status))
            print(f"{status:16s} {m.id:28s} ({secs:.0f} s) {m.doc}", flush=True)
    bad = [m.id for m, s in results if s in ("SURVIVED", "stale", "no-tests")]
    print(f"\n{len(results) - len(bad)}/{len(results)} killed; survivors/stale: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
