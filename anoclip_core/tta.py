"""AnoCLIP+ test-time adaptation (ALGORITHM.md §5) in two modes.

Per image (``adapt_tokens``, what the deployment runtime uses): every image gets its own freshly
initialised adapter (PyTorch's default ``nn.Linear`` init), its own noise and its own AdamW state,
drawn from a generator seeded by ``(seed, index)``. The batched path stacks the per-image
parameters and sums the per-image losses, so each adapter sees exactly the gradients it would see
alone: results equal the one-by-one path, do not depend on the order of the images and share no
state between calls (thread-safe).

Reference (``ClassAdaptation``, what ``anoclip-eval --tta`` uses by default): as the official
code, ONE adapter and ONE AdamW per class; per image only the adapter's weights are reset, so
AdamW's moments and step count carry over from one image of the class to the next, in the order
the images are adapted (the dataset's order). ``ClassAdaptation(..., carry=False)`` is the
per-image mode with the same interface. ``two_crop_loss`` is the VisA variant's loss on merged
full-resolution logits.

Initial adapter weights and noise come from a ``TTASource`` (default ``SeededSource``, the
per-index generators above), a seam through which a test can inject its own.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import AnoCLIPError

VARIANTS = ("text", "linear")


@dataclass(frozen=True)
class TTAConfig:
    """``variant="text"`` is the MVTec adapter (D -> 924 -> text space), ``"linear"`` the VisA one."""

    variant: str = "text"
    steps: int = 5
    lr: float = 1e-3
    noise_std: float = 0.055
    weight_decay: float = 0.01
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise AnoCLIPError(f"TTA variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.steps < 0 or self.lr <= 0 or self.noise_std < 0:
            raise AnoCLIPError(f"invalid TTA settings: steps={self.steps}, lr={self.lr}, noise_std={self.noise_std}")


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def _linear_init(out_dim: int, in_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's default nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    bound = 1.0 / math.sqrt(in_dim)
    w = (torch.rand(out_dim, in_dim, generator=gen) * 2 - 1) * bound
    b = (torch.rand(out_dim, generator=gen) * 2 - 1) * bound
    return w, b


class TTASource(Protocol):
    """Where an image's initial adapter weights and its noise come from (a seam for tests)."""

    def initial(self, index: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (weight [out, in], bias [out]) of image ``index``; called once per adaptation."""
        ...

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise of ``shape`` for image ``index``; called once per step, in order."""
        ...


@dataclass
class SeededSource:
    """Default source: image ``index`` uses ``Generator().manual_seed(seed * 1_000_003 + index)``,
    first for the weight and bias (PyTorch's default init), then for each step's noise."""

    seed: int = 0
    _gens: dict[int, torch.Generator] = field(default_factory=dict, repr=False)

    def initial(self, index: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._gens[index] = _generator(self.seed, index)
        return _linear_init(out_dim, in_dim, self._gens[index])

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        gen = self._gens.setdefault(index, _generator(self.seed, index))
        return torch.randn(*shape, generator=gen)


def adapter_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor | None
) -> torch.Tensor:
    """Apply B adapters: x [B, N, D], weight [B, O, D], bias [B, O] -> [B, N, D].

    text adapter: 0.5 x + 0.5 tanh(W x̂ + b) @ T ; linear adapter: 0.5 x + 0.5 (W x̂ + b).
    """
    xn = F.normalize(x, dim=-1)
    a = torch.baddbmm(bias.unsqueeze(1), xn, weight.transpose(1, 2))
    if text is not None:
        a = torch.tanh(a) @ text
    return 0.5 * x + 0.5 * a


def tta_loss(clean: torch.Tensor, noisy: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image loss [B]: mean entropy(p_clean) + 0.5 mean(-log p_clean[n] - log p_noisy[a])."""
    protos = prototypes.to(clean.dtype)
    p_clean = (F.normalize(clean, dim=-1) @ protos.t() / temperature).log_softmax(-1)
    p_noisy = (F.normalize(noisy, dim=-1) @ protos.t() / temperature).log_softmax(-1)
    entropy = -(p_clean.exp() * p_clean).sum(-1).mean(-1)
    hard = (-p_clean[..., 0] - p_noisy[..., 1]).mean(-1)
    return entropy + 0.5 * hard


@dataclass(frozen=True)
class FittedAdapters:
    """B adapters after fitting: ``weight`` [B, O, D], ``bias`` [B, O], the text matrix (None for
    the linear variant) and the per-step losses [steps, B] (before each optimiser step)."""

    weight: torch.Tensor
    bias: torch.Tensor
    text: torch.Tensor | None
    losses: torch.Tensor

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply the adapters to tokens [B, N, D] or [B, h, w, D] (same B)."""
        shape = tokens.shape
        x = tokens.reshape(shape[0], -1, shape[-1]).float()
        return adapter_forward(x, self.weight, self.bias, self.text).reshape(shape)


def _check_shapes(tokens: torch.Tensor, sentences: torch.Tensor, prototypes: torch.Tensor) -> None:
    if tokens.ndim != 4:
        raise AnoCLIPError(f"TTA expects local tokens [B, h, w, D], got shape {list(tokens.shape)}")
    d = tokens.shape[-1]
    if sentences.ndim != 2 or sentences.shape[1] != d or tuple(prototypes.shape) != (2, d):
        raise AnoCLIPError(
            f"TTA text shapes do not match tokens of dim {d}: sentences {list(sentences.shape)}, "
            f"prototypes {list(prototypes.shape)}"
        )


def fit_adapters(
    tokens: torch.Tensor,
    sentences: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: TTAConfig = TTAConfig(),
    start_index: int = 0,
    source: TTASource | None = None,
) -> FittedAdapters:
    """Initialise and fit one adapter per image of local tokens [B, h, w, D] (see ``adapt_tokens``).

    Runs in float32 with autocast disabled: the adaptation is a small optimisation problem whose
    lr-1e-3 updates reduced precision would round away. ``steps=0`` gives the adapters at init.
    """
    return _fit(tokens, sentences, prototypes, cfg, start_index, source)[0]


def _fit(
    tokens: torch.Tensor,
    sentences: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: TTAConfig,
    start_index: int,
    source: TTASource | None = None,
) -> tuple[FittedAdapters, TTASource]:
    _check_shapes(tokens, sentences, prototypes)
    b, gh, gw, d = tokens.shape
    device = tokens.device
    src = source if source is not None else SeededSource(cfg.seed)
    indices = [start_index + i for i in range(b)]
    with torch.autocast(device_type=device.type, enabled=False):
        x = tokens.detach().float().reshape(b, gh * gw, d)
        text = sentences.detach().float().to(device) if cfg.variant == "text" else None
        protos = prototypes.detach().float().to(device)
        out_dim = text.shape[0] if text is not None else d
        inits = [src.initial(i, out_dim, d) for i in indices]
        weight = torch.stack([w for w, _ in inits]).float().to(device).requires_grad_(True)
        bias = torch.stack([bb for _, bb in inits]).float().to(device).requires_grad_(True)
        opt = torch.optim.AdamW([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def noise() -> torch.Tensor:
            return torch.stack([src.noise(i, (gh * gw, d)) for i in indices]).float().to(device) * cfg.noise_std

        def loss(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
            return tta_loss(clean, noisy, protos, cfg.temperature)

        losses = _run_steps(x, weight, bias, text, opt, noise, loss, cfg.steps)
    loss_table = torch.stack(losses) if losses else torch.zeros(0, b, device=device)
    return FittedAdapters(weight.detach(), bias.detach(), text, loss_table), src


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _run_steps(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor | None,
    opt: torch.optim.Optimizer, noise: Callable[[], torch.Tensor], loss: LossFn, steps: int,
) -> list[torch.Tensor]:
    """``steps`` AdamW steps on the per-image losses [B] of the batch ``[x, x + noise()]``;
    returns each step's losses (before its update)."""
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            eps = noise()
            per_image = loss(adapter_forward(x, weight, bias, text), adapter_forward(x + eps, weight, bias, text))
            losses.append(per_image.detach())
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
    return losses


def adapt_tokens(
    tokens: torch.Tensor,
    sentences: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: TTAConfig = TTAConfig(),
    start_index: int = 0,
    return_losses: bool = False,
    source: TTASource | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Adapt projected local tokens [B, h, w, D] (unnormalised) -> adapted tokens [B, h, w, D].

    ``sentences`` [924, D] are the per-sentence normalised text embeddings (normal first),
    ``prototypes`` [2, D]. Image ``i`` of the batch uses the generator ``(cfg.seed, start_index + i)``,
    so one-by-one and batched calls agree (per-image mode: no state is shared between images or
    calls). With ``return_losses`` also returns the per-step losses [steps + 1, B] (the last
    entry evaluated after the final step). ``source`` overrides the initial weights and noise.
    """
    fitted, src = _fit(tokens, sentences, prototypes, cfg, start_index, source)
    b, gh, gw, d = tokens.shape
    device = tokens.device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        x = tokens.detach().float().reshape(b, gh * gw, d)
        out = fitted(x)
        if return_losses:
            idx = range(start_index, start_index + b)
            noise = torch.stack([src.noise(i, (gh * gw, d)) for i in idx]).float().to(device) * cfg.noise_std
            protos = prototypes.detach().float().to(device)
            final = tta_loss(out, fitted(x + noise), protos, cfg.temperature)
    out = out.reshape(b, gh, gw, d).to(tokens.dtype)
    if return_losses:
        return out, torch.cat([fitted.losses, final.unsqueeze(0)])
    return out


Box = tuple[int, int, int, int]


def merge_crop_logits(logits: torch.Tensor, boxes: Sequence[Box], size: tuple[int, int]) -> torch.Tensor:
    """Crop logits [K, C, h, w] -> [C, H, W]: each crop bilinearly upsampled (align_corners=True) to
    its box, then merged like the VisA maps (averaged where the crops overlap)."""
    total = logits.new_zeros((logits.shape[1], *size))
    count = logits.new_zeros(size)
    for crop, (t, left, bh, bw) in zip(logits, boxes, strict=True):
        up = F.interpolate(crop.unsqueeze(0), size=(bh, bw), mode="bilinear", align_corners=True)[0]
        total[:, t : t + bh, left : left + bw] += up
        count[t : t + bh, left : left + bw] += 1.0
    return total / count.clamp(min=1.0)


def two_crop_loss(
    grid: tuple[int, int], boxes: Sequence[Box], size: tuple[int, int], prototypes: torch.Tensor,
    temperature: float = 1.0,
) -> LossFn:
    """VisA variant's loss (§5): the 2-way logits of each crop are upsampled and merged to the
    resized image ``size``, separately for the clean and the noisy pair; the §5 loss is taken on
    the softmax of the merged full-resolution logits. Adapter outputs are [1, K * h * w, D]."""
    gh, gw = grid
    k = len(boxes)

    def merged_log_probs(out: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(out.reshape(k, gh, gw, -1), dim=-1) @ prototypes.to(out.dtype).t() / temperature
        return merge_crop_logits(logits.permute(0, 3, 1, 2), boxes, size).log_softmax(0).flatten(1)

    def loss(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        lc, ln = merged_log_probs(clean), merged_log_probs(noisy)
        entropy = -(lc.exp() * lc).sum(0).mean()
        hard = (-lc[0] - ln[1]).mean()
        return (entropy + 0.5 * hard).reshape(1)

    return loss


class ClassAdaptation:
    """AnoCLIP+ over the images of ONE class, one image at a time, in the order of the calls.

    ``carry=True`` (reference mode, as the official test loop): one adapter and one AdamW for the
    class; each image resets only the adapter's weights (from ``source.initial``), so AdamW's
    moments and step count carry over to the next image; results depend on the image order.
    ``carry=False``: a fresh AdamW per image (per-image mode; equals ``adapt_tokens``).
    Not thread-safe in either mode (it holds the class's state); use one instance per class.
    """

    def __init__(
        self, sentences: torch.Tensor, prototypes: torch.Tensor, cfg: TTAConfig = TTAConfig(),
        carry: bool = True, source: TTASource | None = None,
    ) -> None:
        self.cfg, self.carry = cfg, carry
        self.source: TTASource = source if source is not None else SeededSource(cfg.seed)
        self.protos = prototypes.detach().float()
        self.text = sentences.detach().float() if cfg.variant == "text" else None
        d = prototypes.shape[-1]
        self.out_dim = self.text.shape[0] if self.text is not None else d
        device = prototypes.device
        self.weight = torch.zeros(1, self.out_dim, d, device=device, requires_grad=True)
        self.bias = torch.zeros(1, self.out_dim, device=device, requires_grad=True)
        self.opt = self._new_optimizer()
        self.losses: list[torch.Tensor] = []

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([self.weight, self.bias], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _reset(self, index: int, in_dim: int) -> None:
        w, b = self.source.initial(index, self.out_dim, in_dim)
        with torch.no_grad():
            self.weight.copy_(w.reshape(self.weight.shape))
            self.bias.copy_(b.reshape(self.bias.shape))
        if not self.carry:
            self.opt = self._new_optimizer()

    def adapt(self, tokens: torch.Tensor, index: int, loss: LossFn | None = None) -> torch.Tensor:
        """Adapt one image's local tokens [K, h, w, D] (K crops sharing one adapter) with the
        seed/noise stream ``index``; ``loss`` defaults to the §5 per-patch loss (K = 1).
        Returns the adapted tokens [K, h, w, D]; the step losses go to ``self.losses``."""
        if tokens.ndim != 4 or tokens.shape[-1] != self.protos.shape[-1]:
            raise AnoCLIPError(f"TTA expects local tokens [K, h, w, {self.protos.shape[-1]}], got {list(tokens.shape)}")
        k, gh, gw, d = tokens.shape
        device = self.weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            x = tokens.detach().float().to(device).reshape(1, k * gh * gw, d)
            if loss is None:
                loss = self._patch_loss
            self._reset(index, d)

            def noise() -> torch.Tensor:
                return self.source.noise(index, (k * gh * gw, d)).float().to(device).unsqueeze(0) * self.cfg.noise_std

            steps = _run_steps(x, self.weight, self.bias, self.text, self.opt, noise, loss, self.cfg.steps)
            self.losses = steps
            with torch.no_grad():
                out = adapter_forward(x, self.weight, self.bias, self.text)
        return out.reshape(k, gh, gw, d).to(tokens.dtype)

    def _patch_loss(self, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        return tta_loss(clean, noisy, self.protos, self.cfg.temperature)
