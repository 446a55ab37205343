"""AnoCLIP+ TTA pinned to ALGORITHM.md §5 by an independent float64 re-implementation.

Numbers from the spec, not from the code: adapter ``0.5 x + 0.5 tanh(W x̂ + b) @ T`` (W: D -> 924,
PyTorch default Linear init), batch ``[x, x + eps]`` with eps ~ N(0, 0.055²), loss
``mean H(p_clean) + 0.5 mean(-log p_clean[n] - log p_noisy[a])`` at temperature T, 5 AdamW
steps with lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (decoupled), written out
by hand below. Only the random stream is shared with the code (the core documents it: one
generator per image seeded ``seed * 1_000_003 + index``; weight, bias, then one noise draw per
step). Runs at T = 0.5 so a dropped temperature fails too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

D, H, W, S = 32, 4, 4, 924
SPEC = dict(steps=5, lr=1e-3, noise=0.055, wd=0.01, temperature=0.5)


def _data():
    g = np.random.default_rng(3)
    tokens = g.normal(size=(2, H, W, D)).astype(np.float32) * 0.3
    sents = g.normal(size=(S, D))
    sents = (sents / np.linalg.norm(sents, axis=1, keepdims=True)).astype(np.float32)
    protos = g.normal(size=(2, D))
    protos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)
    return tokens, sents, protos


def hand_tta(tokens, sents, protos, index, steps, lr, noise, wd, temperature):
    """One image's adapted patch probabilities [H, W], float64, AdamW written out."""
    gen = torch.Generator().manual_seed(0 * 1_000_003 + index)
    bound = 1.0 / math.sqrt(D)
    w = ((torch.rand(S, D, generator=gen) * 2 - 1) * bound).double()
    b = ((torch.rand(S, generator=gen) * 2 - 1) * bound).double()
    x = torch.from_numpy(tokens[index].reshape(-1, D)).double()
    tm, pm = torch.from_numpy(sents).double(), torch.from_numpy(protos).double()

    def adapt(inp, w, b):
        xn = inp / inp.norm(dim=-1, keepdim=True)
        return 0.5 * inp + 0.5 * torch.tanh(xn @ w.t() + b) @ tm

    def logp(out):
        return ((out / out.norm(dim=-1, keepdim=True)) @ pm.t() / temperature).log_softmax(-1)

    params = [w, b]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        eps = torch.randn(H * W, D, generator=gen).double() * noise
        ps = [p.clone().requires_grad_(True) for p in params]
        lc, ln = logp(adapt(x, *ps)), logp(adapt(x + eps, *ps))
        loss = -(lc.exp() * lc).sum(-1).mean() + 0.5 * (-lc[:, 0] - ln[:, 1]).mean()
        grads = torch.autograd.grad(loss, ps)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.mul_(1 - lr * wd)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            mhat, vhat = m[i] / (1 - 0.9 ** t), v[i] / (1 - 0.999 ** t)
            p.sub_(lr * mhat / (vhat.sqrt() + 1e-8))
    with torch.no_grad():
        return logp(adapt(x, *params)).exp()[:, 1].reshape(H, W).numpy()


def test_runtime_tta_equals_the_spec_at_t_half():
    from anoclip.runtime.tta import adapted_patch_probs

    tokens, sents, protos = _data()
    got = adapted_patch_probs(tokens, sents, protos, temperature=SPEC["temperature"])
    ref = np.stack([hand_tta(tokens, sents, protos, i, **SPEC) for i in range(2)])
    err = np.abs(got - ref).max()
    assert err < 1e-5
    # each pinned constant matters by far more than the tolerance (so a wrong default fails)
    for key, wrong in (("steps", 4), ("lr", 1.5e-3), ("noise", 0.08), ("wd", 0.0), ("temperature", 1.0)):
        alt = hand_tta(tokens, sents, protos, 0, **{**SPEC, key: wrong})
        assert np.abs(alt - ref[0]).max() > 10 * max(err, 1e-7), key
