"""AnoCLIP+ test-time adaptation (ALGORITHM.md §5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip_core.errors import AnoCLIPError
from anoclip_core.tta import TTAConfig, adapt_tokens, adapter_forward, fit_adapters, tta_loss

VARIANTS = ["text", "linear"]


@pytest.fixture(scope="module")
def tokens_and_text(tiny_model):
    """Real projected local tokens of the tiny model for 3 different images, and bottle's text."""
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, local = tiny_model.encode_tokens(x)
    states = tiny_model.state_embeddings("bottle")
    return local, states.sentences, states.prototypes


def np_adapter(x: np.ndarray, w: np.ndarray, b: np.ndarray, text: np.ndarray | None) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    a = xn @ w.T + b
    if text is not None:
        a = np.tanh(a) @ text
    return 0.5 * x + 0.5 * a


def np_loss(clean: np.ndarray, noisy: np.ndarray, protos: np.ndarray) -> float:
    def probs(t):
        t = t / np.linalg.norm(t, axis=-1, keepdims=True)
        z = t @ protos.T
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    pc, pn = probs(clean), probs(noisy)
    entropy = -(pc * np.log(pc)).sum(-1).mean()
    hard = (-np.log(pc[:, 0]) - np.log(pn[:, 1])).mean()
    return float(entropy + 0.5 * hard)


def test_tta_loss_matches_formula():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 10, 8, generator=gen, dtype=torch.float64)
    noisy = clean + 0.3 * torch.randn(2, 10, 8, generator=gen, dtype=torch.float64)
    protos = F.normalize(torch.randn(2, 8, generator=gen, dtype=torch.float64), dim=-1)
    loss = tta_loss(clean, noisy, protos, temperature=1.0)
    assert loss.shape == (2,)
    for b in range(2):
        assert loss[b].item() == pytest.approx(np_loss(clean[b].numpy(), noisy[b].numpy(), protos.numpy()), abs=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_forward_matches_formula(variant):
    gen = torch.Generator().manual_seed(2)
    d, o = 8, 12 if variant == "text" else 8
    x = torch.randn(2, 5, d, generator=gen, dtype=torch.float64)
    w = torch.randn(2, o, d, generator=gen, dtype=torch.float64)
    b = torch.randn(2, o, generator=gen, dtype=torch.float64)
    text = F.normalize(torch.randn(o, d, generator=gen, dtype=torch.float64), dim=-1) if variant == "text" else None
    out = adapter_forward(x, w, b, text)
    for i in range(2):
        exp = np_adapter(x[i].numpy(), w[i].numpy(), b[i].numpy(), None if text is None else text.numpy())
        np.testing.assert_allclose(out[i].numpy(), exp, atol=1e-12)


@pytest.fixture(scope="module")
def separated_text():
    """Synthetic text side with well separated states (D = 32): normal sentences scattered around
    t_n, abnormal ones around t_a. With the tiny random text tower t_n ~ t_a and every patch sits at
    p ~ 0.5, where the loss is flat; here the loss has something to learn."""
    gen = torch.Generator().manual_seed(11)
    protos = F.normalize(torch.randn(2, 32, generator=gen), dim=-1)
    normal = F.normalize(protos[0] + 0.7 * torch.randn(462, 32, generator=gen), dim=-1)
    abnormal = F.normalize(protos[1] + 0.7 * torch.randn(462, 32, generator=gen), dim=-1)
    return torch.cat([normal, abnormal]), protos


def _loss64(adapters, x: torch.Tensor, noise: torch.Tensor, protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """tta_loss of fitted adapters on clean x and x + noise, evaluated in float64."""
    text = None if adapters.text is None else adapters.text.double()
    w, b = adapters.weight.double(), adapters.bias.double()
    clean = adapter_forward(x.double(), w, b, text)
    noisy = adapter_forward((x + noise).double(), w, b, text)
    return tta_loss(clean, noisy, protos.double(), temperature)


# Why not T = 1 here: with raw cosines every patch sits near p = 0.5 and, since clean ~ noisy,
# entropy(p) + 0.5 (-log(1 - p) - log p) has zero curvature there (-4 + 4). The reference's 5 AdamW
# steps at lr 1e-3 then move the loss by ~1e-5, in a direction set by the per-step noise sample,
# so "the loss went down" is not a property T = 1 has (measured: up on some seeds, both variants).
# With a CLIP-like temperature the loss has a slope and the optimisation must visibly descend.
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptation_lowers_its_loss(tokens_and_text, separated_text, variant, seed):
    local = tokens_and_text[0]
    sentences, protos = separated_text
    tau = 0.07
    cfg = TTAConfig(variant=variant, temperature=tau, seed=seed)  # 5 steps, lr 1e-3, noise 0.055
    init = fit_adapters(local, sentences, protos, TTAConfig(variant=variant, temperature=tau, seed=seed, steps=0))
    fitted = fit_adapters(local, sentences, protos, cfg)
    assert fitted.losses.shape == (5, 3)
    b, gh, gw, d = local.shape
    x = local.reshape(b, gh * gw, d)
    for noise_seed in (123, 456):  # fixed noises, not the ones drawn during adaptation
        noise = torch.randn(b, gh * gw, d, generator=torch.Generator().manual_seed(noise_seed)) * 0.055
        before = _loss64(init, x, noise, protos, tau)
        after = _loss64(fitted, x, noise, protos, tau)
        assert torch.all(after < before - 1e-3), (variant, before, after)
    assert (fitted.weight - init.weight).abs().max() > 1e-4  # the adapter actually moved


@pytest.mark.parametrize("variant", VARIANTS)
def test_adaptation_lowers_its_loss_real_text(tokens_and_text, variant):
    """Same with the tiny model's own bottle prompts (nearly identical prototypes: sharp T needed)."""
    local, sentences, protos = tokens_and_text
    tau = 0.01
    init = fit_adapters(local, sentences, protos, TTAConfig(variant=variant, temperature=tau, steps=0))
    fitted = fit_adapters(local, sentences, protos, TTAConfig(variant=variant, temperature=tau))
    b, gh, gw, d = local.shape
    x = local.reshape(b, gh * gw, d)
    noise = torch.randn(b, gh * gw, d, generator=torch.Generator().manual_seed(7)) * 0.055
    assert torch.all(_loss64(fitted, x, noise, protos, tau) < _loss64(init, x, noise, protos, tau) - 1e-3)


def test_adapt_tokens_reports_losses(tokens_and_text, separated_text):
    local = tokens_and_text[0]
    sentences, protos = separated_text
    cfg = TTAConfig(temperature=0.07)
    out, losses = adapt_tokens(local, sentences, protos, cfg, return_losses=True)
    assert out.shape == local.shape and losses.shape == (6, 3)
    assert torch.all(losses[-1] < losses[0])
    fitted = fit_adapters(local, sentences, protos, cfg)
    torch.testing.assert_close(losses[:-1], fitted.losses)
    torch.testing.assert_close(out, fitted(local), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_under_seed(tokens_and_text, variant):
    local, sentences, protos = tokens_and_text
    a = adapt_tokens(local, sentences, protos, TTAConfig(variant=variant, seed=7))
    b = adapt_tokens(local, sentences, protos, TTAConfig(variant=variant, seed=7))
    c = adapt_tokens(local, sentences, protos, TTAConfig(variant=variant, seed=8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4
    # independent of the global RNG state
    torch.manual_seed(999)
    torch.randn(10)
    assert torch.equal(a, adapt_tokens(local, sentences, protos, TTAConfig(variant=variant, seed=7)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_one_by_one(tokens_and_text, variant):
    local, sentences, protos = tokens_and_text
    cfg = TTAConfig(variant=variant, seed=3)
    batched = adapt_tokens(local, sentences, protos, cfg)
    singles = [adapt_tokens(local[i : i + 1], sentences, protos, cfg, start_index=i) for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], singles[i], atol=1e-5, rtol=0)
    # the start index matters: image 1 alone with index 0 is adapted differently
    other = adapt_tokens(local[1:2], sentences, protos, cfg, start_index=0)
    assert (other - singles[1]).abs().max() > 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_steps_is_adapter_at_init(tokens_and_text, variant):
    local, sentences, protos = tokens_and_text
    seed = 5
    out = adapt_tokens(local, sentences, protos, TTAConfig(variant=variant, steps=0, seed=seed))
    d = local.shape[-1]
    o = sentences.shape[0] if variant == "text" else d
    bound = 1.0 / math.sqrt(d)  # PyTorch's nn.Linear default init: U(-1/sqrt(in), 1/sqrt(in))
    init = fit_adapters(local, sentences, protos, TTAConfig(variant=variant, steps=0, seed=seed))
    assert init.weight.shape == (3, o, d) and init.bias.shape == (3, o)
    assert init.weight.abs().max() <= bound and init.bias.abs().max() <= bound
    assert init.weight.abs().max() > 0.9 * bound  # spread over the whole interval, not a tiny init
    assert abs(init.weight.mean().item()) < 0.05 * bound
    for i in range(3):
        exp = np_adapter(
            local[i].reshape(-1, d).double().numpy(),
            init.weight[i].double().numpy(),
            init.bias[i].double().numpy(),
            sentences.double().numpy() if variant == "text" else None,
        )
        np.testing.assert_allclose(out[i].reshape(-1, d).numpy(), exp, atol=1e-5)
    # each image of the batch gets its own draw
    assert (init.weight[0] - init.weight[1]).abs().max() > 1e-3


def test_zero_steps_init_uses_documented_generator(tokens_and_text):
    """Image i draws its adapter (weight, then bias) from Generator().manual_seed(seed * 1_000_003 + i)."""
    local, sentences, protos = tokens_and_text
    init = fit_adapters(local, sentences, protos, TTAConfig(steps=0, seed=2), start_index=4)
    d = local.shape[-1]
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 5)  # image 1 of a batch starting at index 4
    bound = 1.0 / math.sqrt(d)
    w = (torch.rand(924, d, generator=gen) * 2 - 1) * bound
    b = (torch.rand(924, generator=gen) * 2 - 1) * bound
    assert torch.equal(init.weight[1], w) and torch.equal(init.bias[1], b)


def test_tta_changes_map_not_score(tiny_model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    maps, scores = tiny_model.predict(x, "bottle")
    maps_t, scores_t = tiny_model.predict(x, "bottle", tta=True)
    maps_lin, _ = tiny_model.predict(x, "bottle", tta=TTAConfig(variant="linear"))
    assert torch.equal(scores, scores_t)
    assert (maps - maps_t).abs().max() > 1e-4
    assert (maps_lin - maps_t).abs().max() > 1e-4
    assert maps_t.min() >= 0 and maps_t.max() <= 1
    # predict's TTA is adapt_tokens on the projected local tokens, then the §4 map
    _, local = tiny_model.encode_tokens(x)
    st = tiny_model.state_embeddings("bottle")
    adapted = F.normalize(adapt_tokens(local, st.sentences, st.prototypes, TTAConfig()), dim=-1)
    from anoclip_core.scores import anomaly_map

    torch.testing.assert_close(maps_t, anomaly_map(adapted, st.prototypes, (64, 64)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs", [dict(variant="mlp"), dict(steps=-1), dict(lr=0.0), dict(noise_std=-0.1)]
)
def test_config_validation(kwargs):
    with pytest.raises(AnoCLIPError):
        TTAConfig(**kwargs)


def test_shape_errors(tokens_and_text):
    local, sentences, protos = tokens_and_text
    with pytest.raises(AnoCLIPError, match="local tokens"):
        adapt_tokens(local.reshape(3, 64, 32), sentences, protos)
    with pytest.raises(AnoCLIPError, match="do not match"):
        adapt_tokens(local, sentences[:, :16], protos)
    with pytest.raises(AnoCLIPError, match="do not match"):
        adapt_tokens(local, sentences, protos[:1])


def test_tta_runs_in_float32_under_autocast(tokens_and_text):
    local, sentences, protos = tokens_and_text
    ref = adapt_tokens(local, sentences, protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = adapt_tokens(local, sentences, protos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
