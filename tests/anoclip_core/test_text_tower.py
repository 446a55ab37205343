"""The truncated text forward equals open_clip's full 77-token ``encode_text``."""
from __future__ import annotations

import copy

import pytest
import torch

from anoclip_core.prompts import state_sentences
from anoclip_core.text_tower import can_truncate, encode_text_truncated, pooled_positions


def _sentences(n: int | None = None) -> list[str]:
    s = state_sentences("bottle")
    out = list(s.normal + s.abnormal)
    return out[:n] if n else out


def _transformer_lengths(clip) -> list[int]:
    """Sequence lengths the text transformer is run at (recorded by a forward pre-hook)."""
    seen: list[int] = []

    def hook(_mod, args, _kwargs):
        x = args[0]
        seen.append(x.shape[1] if clip.transformer.batch_first else x.shape[0])

    clip.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_truncated_equals_full_context(tiny_model):
    clip = tiny_model.clip
    tokens = tiny_model._tokenizer(_sentences())
    assert can_truncate(clip)
    with torch.no_grad():
        full = clip.encode_text(tokens)
        cut = encode_text_truncated(clip, tokens)
    assert cut.shape == full.shape
    # float rounding of the shorter matrix products only: 1e-6 of the embeddings' scale
    scale = float(full.abs().max())
    assert float((cut - full).abs().max()) <= 1e-6 * max(scale, 1.0)
    assert float(full.std()) > 1e-2  # the comparison is not between near-constant vectors


def test_context_is_cut_to_longest_sentence(tiny_model):
    clip = copy.deepcopy(tiny_model.clip)
    lengths = _transformer_lengths(clip)
    sents = ["a photo of a bottle", "a cropped industrial photo of the flawless bottle for anomaly detection"]
    tokens = tiny_model._tokenizer(sents)
    # independent count: EOT is the largest token id; its index + 1 is the needed length
    expected = max(int(row.tolist().index(max(row.tolist()))) for row in tokens) + 1
    with torch.no_grad():
        encode_text_truncated(clip, tokens)
    assert lengths == [expected]
    assert expected < tokens.shape[1]


def test_later_positions_do_not_change_pooled_output(tiny_model):
    """The causal argument itself, on the untouched full forward: garbage after EOT changes nothing."""
    clip = tiny_model.clip
    tokens = tiny_model._tokenizer(_sentences(8))
    noisy = tokens.clone()
    eot = pooled_positions(clip, tokens)
    gen = torch.Generator().manual_seed(0)
    for row, p in enumerate(eot.tolist()):
        n = tokens.shape[1] - p - 1
        noisy[row, p + 1:] = torch.randint(1, int(tokens.max()) - 1, (n,), generator=gen)
    with torch.no_grad():
        a, b = clip.encode_text(tokens), clip.encode_text(noisy)
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_no_causal_mask_uses_full_context(tiny_model):
    clip = copy.deepcopy(tiny_model.clip)
    clip.attn_mask = None
    assert not can_truncate(clip)
    lengths = _transformer_lengths(clip)
    tokens = tiny_model._tokenizer(_sentences(4))
    with torch.no_grad():
        encode_text_truncated(clip, tokens)
    assert lengths == [tokens.shape[1]]


@pytest.mark.parametrize("pool", ["first", "last"])
def test_other_pooling_uses_full_context(tiny_model, pool):
    clip = copy.deepcopy(tiny_model.clip)
    clip.text_pool_type = pool
    assert not can_truncate(clip)


def test_non_causal_mask_detected(tiny_model):
    clip = copy.deepcopy(tiny_model.clip)
    n = clip.attn_mask.shape[0]
    clip.attn_mask = torch.zeros(n, n)
    assert not can_truncate(clip)


def test_state_embeddings_unchanged(tiny_model, tmp_path):
    """Prototypes through the model's own text path match a full-context computation by hand."""
    from anoclip_core import AnoCLIP

    model = AnoCLIP.create(tiny_model.backbone, pretrained=None, cache_dir=tmp_path)
    emb = model.state_embeddings("bottle")
    sents = _sentences()
    with torch.no_grad():
        full = torch.cat([model.clip.encode_text(model._tokenizer(sents[i:i + 128])) for i in range(0, 924, 128)])
    normal, abnormal = full[:462].mean(0), full[462:].mean(0)
    expected = torch.nn.functional.normalize(torch.stack([normal, abnormal]), dim=-1)
    assert torch.allclose(emb.prototypes.cpu(), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ViT-B-16-plus-240", "ViT-L-14"])
def test_real_text_tower_truncation(backbone):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(backbone, pretrained=None).eval()
    tokens = open_clip.get_tokenizer(backbone)(_sentences(64))
    with torch.no_grad():
        full, cut = clip.encode_text(tokens), encode_text_truncated(clip, tokens)
    assert float((cut - full).abs().max()) <= 1e-6 * max(float(full.abs().max()), 1.0)
