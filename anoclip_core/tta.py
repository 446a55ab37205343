"""AnoCLIP+ test-time adaptation (ALGORITHM.md §5), one adapter per image, batched.

Every image gets its own freshly initialised adapter (PyTorch's default ``nn.Linear`` init),
its own noise and its own AdamW state, drawn from a generator seeded by ``(seed, index)``. The
batched path stacks the per-image parameters and sums the per-image losses, so each adapter
sees exactly the gradients it would see alone: results equal the one-by-one path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def adapter_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
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
) -> FittedAdapters:
    """Initialise and fit one adapter per image of local tokens [B, h, w, D] (see ``adapt_tokens``).

    Runs in float32 with autocast disabled: the adaptation is a small optimisation problem whose
    lr-1e-3 updates reduced precision would round away. ``steps=0`` gives the adapters at init.
    """
    return _fit(tokens, sentences, prototypes, cfg, start_index)[0]


def _fit(
    tokens: torch.Tensor,
    sentences: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: TTAConfig,
    start_index: int,
) -> tuple[FittedAdapters, list[torch.Generator]]:
    _check_shapes(tokens, sentences, prototypes)
    b, gh, gw, d = tokens.shape
    device = tokens.device
    with torch.autocast(device_type=device.type, enabled=False):
        x = tokens.detach().float().reshape(b, gh * gw, d)
        text = sentences.detach().float().to(device) if cfg.variant == "text" else None
        protos = prototypes.detach().float().to(device)
        out_dim = text.shape[0] if text is not None else d
        gens = [_generator(cfg.seed, start_index + i) for i in range(b)]
        inits = [_linear_init(out_dim, d, g) for g in gens]
        weight = torch.stack([w for w, _ in inits]).to(device).requires_grad_(True)
        bias = torch.stack([bb for _, bb in inits]).to(device).requires_grad_(True)
        opt = torch.optim.AdamW([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        with torch.enable_grad():
            for _ in range(cfg.steps):
                noise = torch.stack([torch.randn(gh * gw, d, generator=g) for g in gens]).to(device) * cfg.noise_std
                clean = adapter_forward(x, weight, bias, text)
                noisy = adapter_forward(x + noise, weight, bias, text)
                per_image = tta_loss(clean, noisy, protos, cfg.temperature)
                losses.append(per_image.detach())
                opt.zero_grad(set_to_none=True)
                per_image.sum().backward()
                opt.step()
    loss_table = torch.stack(losses) if losses else torch.zeros(0, b, device=device)
    return FittedAdapters(weight.detach(), bias.detach(), text, loss_table), gens


def adapt_tokens(
    tokens: torch.Tensor,
    sentences: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: TTAConfig = TTAConfig(),
    start_index: int = 0,
    return_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Adapt projected local tokens [B, h, w, D] (unnormalised) -> adapted tokens [B, h, w, D].

    ``sentences`` [924, D] are the per-sentence normalised text embeddings (normal first),
    ``prototypes`` [2, D]. Image ``i`` of the batch uses the generator ``(cfg.seed, start_index + i)``,
    so one-by-one and batched calls agree. With ``return_losses`` also returns the per-step
    losses [steps + 1, B] (the last entry evaluated after the final step).
    """
    fitted, gens = _fit(tokens, sentences, prototypes, cfg, start_index)
    b, gh, gw, d = tokens.shape
    device = tokens.device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        x = tokens.detach().float().reshape(b, gh * gw, d)
        out = fitted(x)
        if return_losses:
            noise = torch.stack([torch.randn(gh * gw, d, generator=g) for g in gens]).to(device) * cfg.noise_std
            protos = prototypes.detach().float().to(device)
            final = tta_loss(out, fitted(x + noise), protos, cfg.temperature)
    out = out.reshape(b, gh, gw, d).to(tokens.dtype)
    if return_losses:
        return out, torch.cat([fitted.losses, final.unsqueeze(0)])
    return out
