"""anoclip-eval --tta in reference mode replays the official AnoCLIP+ test loop (ALGORITHM.md §5).

The replay below is written from ALGORITHM.md alone: an ``nn.Linear`` adapter and ONE
``torch.optim.AdamW`` per class, the adapter's weights reset per image, 5 steps on the batch
[x, x + eps] (VisA: [c1, c2, c1 + eps, c2 + eps] with the loss on merged full-resolution
logits), then the §4 map. It shares only the encoder (tokens) and the VisA crop preprocessing
with the code under test; initial weights and noise are injected into both through the
project's ``TTASource`` seam so the two runs see the same numbers.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip_core.datasets import load_samples
from anoclip_core.evaluate import EvalConfig, predict_class, two_crop_inputs

STEPS, LR, WD, SIGMA = 5, 1e-3, 0.01, 0.055
N_IMAGES = 4


def write_png(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mvtec_one_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec-ref")
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        write_png(root / "bottle" / "test" / "good" / f"{i:03d}.png", rng, (40, 48))
    return root


@pytest.fixture(scope="module")
def visa_one_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("visa-ref")
    rng = np.random.default_rng(6)
    rows = ["object,split,label,image,mask"]
    for i in range(N_IMAGES):
        write_png(root / "candle/Data/Images/Normal" / f"{i:04d}.png", rng, (30, 50))
        rows.append(f"candle,test,normal,candle/Data/Images/Normal/{i:04d}.png,")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


class InjectedSource:
    """Fixed initial weights and noise per image index (the test's, not the project's RNG)."""

    def __init__(self, out_dim: int, in_dim: int, noise_rows: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_dim)
        self.inits = [((torch.rand(out_dim, in_dim, generator=gen) * 2 - 1) * bound,
                       (torch.rand(out_dim, generator=gen) * 2 - 1) * bound) for _ in range(N_IMAGES)]
        self.noises = [[torch.randn(noise_rows, in_dim, generator=gen) for _ in range(STEPS)] for _ in range(N_IMAGES)]
        self.calls: dict[int, int] = {}

    def initial(self, index: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls[index] = 0
        w, b = self.inits[index]
        assert w.shape == (out_dim, in_dim)
        return w.clone(), b.clone()

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = self.noises[index][self.calls[index]]
        self.calls[index] += 1
        assert tuple(n.shape) == tuple(shape)
        return n.clone()


# the replay ----------------------------------------------------------------------------------
class Adapter(torch.nn.Module):
    """§5: out = 0.5 x + 0.5 tanh(W x/|x| + b) @ T (MVTec) or 0.5 x + 0.5 (W x/|x| + b) (VisA)."""

    def __init__(self, dim: int, text: torch.Tensor | None) -> None:
        super().__init__()
        self.text = text
        self.fc = torch.nn.Linear(dim, text.shape[0] if text is not None else dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc(x / x.norm(dim=-1, keepdim=True))
        if self.text is not None:
            a = torch.tanh(a) @ self.text
        return 0.5 * x + 0.5 * a


def loss_from_logits(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """§5 loss from 2-way logits [..., 2] (index 0 normal, 1 abnormal)."""
    pc, pn = clean.softmax(-1), noisy.softmax(-1)
    entropy = (-(pc * torch.log(pc)).sum(-1)).mean()
    return entropy + 0.5 * (-torch.log(pc[..., 0]) - torch.log(pn[..., 1])).mean()


def cos_logits(out: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return (out / out.norm(dim=-1, keepdim=True)) @ protos.t()


def patch_map(tokens: torch.Tensor, protos: torch.Tensor, size: int) -> torch.Tensor:
    """§4 map of tokens [h, w, D]: softmax[abnormal], replicate pad, 3 x 3 mean, bilinear (align)."""
    p = cos_logits(tokens, protos).softmax(-1)[..., 1][None, None]
    p = F.avg_pool2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.interpolate(p, size=(size, size), mode="bilinear", align_corners=True)[0, 0]


def merge_two(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """Two [..., S, S] crops of a [..., S, width] image (width >= S): left from a, overlap averaged, right from b."""
    s = a.shape[-1]
    off = width - s
    out = torch.zeros(*a.shape[:-1], width, dtype=a.dtype)
    out[..., :off] = a[..., :off]
    out[..., off:s] = 0.5 * (a[..., off:] + b[..., : s - off])
    out[..., s:] = b[..., s - off :]
    return out


def up_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """[h, w, 2] -> [S, S, 2], bilinear, align_corners=True."""
    z = F.interpolate(logits.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", align_corners=True)
    return z[0].permute(1, 2, 0)


def merged_logits(logits: torch.Tensor, size: int, width: int) -> torch.Tensor:
    """Crop logits [2, h, w, 2] -> merged full-resolution logits [S, width, 2]."""
    a, b = (up_logits(c, size).permute(2, 0, 1) for c in logits)
    return merge_two(a, b, width).permute(1, 2, 0)


def replay_class(tokens: list[torch.Tensor], text: torch.Tensor | None, protos: torch.Tensor, src: InjectedSource,
                 size: int, visa_width: int | None = None, carry: bool = True) -> list[torch.Tensor]:
    """The official per-class loop; tokens[i] is [h, w, D] (MVTec) or [2, h, w, D] (VisA crops).
    ``carry=False`` is the per-image mode (a new AdamW per image)."""
    dim = protos.shape[1]
    adapter = Adapter(dim, text)
    opt = torch.optim.AdamW(adapter.parameters(), lr=LR, weight_decay=WD)
    maps = []
    for i, x in enumerate(tokens):
        if not carry:
            opt = torch.optim.AdamW(adapter.parameters(), lr=LR, weight_decay=WD)
        with torch.no_grad():
            adapter.fc.weight.copy_(src.inits[i][0])
            adapter.fc.bias.copy_(src.inits[i][1])
        for step in range(STEPS):
            eps = src.noises[i][step].reshape(x.shape) * SIGMA
            out = adapter(torch.cat([x.reshape(-1, dim), (x + eps).reshape(-1, dim)]))
            clean, noisy = cos_logits(out, protos).reshape(2, *x.shape[:-1], 2)
            if visa_width is not None:
                clean, noisy = merged_logits(clean, size, visa_width), merged_logits(noisy, size, visa_width)
            loss = loss_from_logits(clean, noisy)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            adapted = adapter(x.reshape(-1, dim)).reshape(x.shape)
        if visa_width is None:
            maps.append(patch_map(adapted, protos, size))
        else:
            maps.append(merge_two(patch_map(adapted[0], protos, size), patch_map(adapted[1], protos, size), visa_width))
    return maps


# the tests -----------------------------------------------------------------------------------
def run_eval(model, root: Path, dataset: str, cls: str, src: InjectedSource, mode: str = "reference",
             batch_size: int = 3) -> list[np.ndarray]:
    samples = load_samples(dataset, root, [cls])
    cfg = EvalConfig(dataset, str(root), classes=(cls,), views=False, tta=True, tta_mode=mode, progress=False,
                     batch_size=batch_size)
    return predict_class(model, samples, cfg, source=src).maps


def mvtec_tokens(model, root: Path) -> list[torch.Tensor]:
    samples = load_samples("mvtec", root, ["bottle"])
    _, local = model.encode_tokens(model.load_images([s.path for s in samples]))
    return [t.float() for t in local]


def visa_tokens(model, root: Path) -> tuple[list[torch.Tensor], int]:
    samples = load_samples("visa", root, ["candle"])
    out, width = [], 0
    for s in samples:
        crops, boxes, (h, width) = two_crop_inputs(cv2.imread(str(s.path))[:, :, ::-1] / 255.0, model.preprocess_config)
        assert h == model.image_size and width > h and boxes[1][1] == width - h  # landscape: side by side
        _, local = model.encode_tokens(torch.from_numpy(crops))
        out.append(local.float())
    return out, width


@pytest.mark.parametrize("mode", ["reference", "per-image"])
def test_mvtec_tta_replays_official_loop(tiny_model, mvtec_one_class: Path, mode: str) -> None:
    states = tiny_model.state_embeddings("bottle")
    d = states.prototypes.shape[1]
    grid = tiny_model.grid_size
    src = InjectedSource(states.sentences.shape[0], d, grid[0] * grid[1], seed=11)
    got = run_eval(tiny_model, mvtec_one_class, "mvtec", "bottle", src, mode)
    want = replay_class(mvtec_tokens(tiny_model, mvtec_one_class), states.sentences.float(),
                        states.prototypes.float(), src, tiny_model.image_size, carry=mode == "reference")
    assert len(got) == N_IMAGES
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["reference", "per-image"])
def test_visa_tta_replays_official_loop(tiny_model, visa_one_class: Path, mode: str) -> None:
    states = tiny_model.state_embeddings("candle")
    d = states.prototypes.shape[1]
    grid = tiny_model.grid_size
    src = InjectedSource(d, d, 2 * grid[0] * grid[1], seed=12)
    got = run_eval(tiny_model, visa_one_class, "visa", "candle", src, mode)
    tokens, width = visa_tokens(tiny_model, visa_one_class)
    want = replay_class(tokens, None, states.prototypes.float(), src, tiny_model.image_size, visa_width=width,
                        carry=mode == "reference")
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataset", ["mvtec", "visa"])
def test_modes_differ_beyond_tolerance(tiny_model, mvtec_one_class: Path, visa_one_class: Path, dataset: str) -> None:
    """The carried AdamW state changes later images' maps by far more than the 1e-5 replay
    tolerance (so the replay tests can tell the modes apart); the first image is the same."""
    cls, root = ("bottle", mvtec_one_class) if dataset == "mvtec" else ("candle", visa_one_class)
    states = tiny_model.state_embeddings(cls)
    d, (gh, gw) = states.prototypes.shape[1], tiny_model.grid_size
    out_dim, rows = (states.sentences.shape[0], gh * gw) if dataset == "mvtec" else (d, 2 * gh * gw)
    ref = run_eval(tiny_model, root, dataset, cls, InjectedSource(out_dim, d, rows, seed=3), "reference")
    per = run_eval(tiny_model, root, dataset, cls, InjectedSource(out_dim, d, rows, seed=3), "per-image")
    np.testing.assert_allclose(ref[0], per[0], atol=1e-6)
    assert max(float(np.abs(r - p).max()) for r, p in zip(ref[1:], per[1:], strict=True)) > 1e-4


def test_reference_mode_does_not_depend_on_batch_size(tiny_model, visa_one_class: Path) -> None:
    """Default seeded stream: images adapt one at a time in dataset order whatever the batching."""
    samples = load_samples("visa", visa_one_class, ["candle"])
    runs = []
    for bs in (1, 3):
        cfg = EvalConfig("visa", str(visa_one_class), classes=("candle",), tta=True, progress=False, batch_size=bs)
        runs.append(np.stack(predict_class(tiny_model, samples, cfg).maps))
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-6)


def test_per_image_mode_equals_adapt_tokens(tiny_model) -> None:
    """carry=False is the runtime's per-image adaptation: same seeded streams, same result."""
    from anoclip_core.tta import ClassAdaptation, TTAConfig, adapt_tokens

    states = tiny_model.state_embeddings("bottle")
    _, local = tiny_model.encode_tokens(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    cfg = TTAConfig(temperature=tiny_model.temperature)
    batched = adapt_tokens(local, states.sentences, states.prototypes, cfg)
    one = ClassAdaptation(states.sentences, states.prototypes, cfg, carry=False)
    seq = torch.cat([one.adapt(local[i : i + 1], i) for i in range(3)])
    torch.testing.assert_close(seq, batched, atol=1e-6, rtol=0)
    ref = ClassAdaptation(states.sentences, states.prototypes, cfg, carry=True)
    carried = torch.cat([ref.adapt(local[i : i + 1], i) for i in range(3)])
    torch.testing.assert_close(carried[0], batched[0], atol=1e-6, rtol=0)
    assert (carried[1:] - batched[1:]).abs().max() > 1e-4
