"""State prompts (ALGORITHM.md §3), prototypes and the on-disk text cache.

The expected sentences are written out here from the algorithm text (and the official
``prompt_ensemble.py``), not generated with ``prompts.py``'s own tables.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoclip_core import AnoCLIP
from anoclip_core.errors import AnoCLIPError
from anoclip_core.model import WeightsInfo
from anoclip_core.prompts import PromptCache, StateSentences, encode_sentences, state_sentences, templates

NORMAL = ["normal {}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ABNORMAL = ["damaged {}", "abnormal {}", "imperfect {}", "blemished {}", "{} with flaw", "{} with defect",
            "{} with damage"]
PATTERNS = [
    "a cropped W of the {}", "a cropped W of a {}", "a close-up W of a {}", "a close-up W of the {}",
    "a bright W of a {}", "a bright W of the {}", "a dark W of the {}", "a dark W of a {}",
    "a jpeg corrupted W of a {}", "a jpeg corrupted W of the {}", "a blurry W of the {}",
    "a blurry W of a {}", "A W of a {}", "A W of the {}", "A W of a small {}", "A W of the small {}",
    "A W of a large {}", "A W of the large {}", "A W of the {} for visual inspection",
    "A W of a {} for visual inspection", "A W of the {} for anomaly detection",
    "A W of a {} for anomaly detection",
]
WORDS = {
    "object": [("an", "industrial photo"), ("an", "industrial image"), ("a", "manufacturing image")],
    "texture": [("an", "industrial photo"), ("a", "textural photo"), ("a", "surface picture")],
}


def expected_templates(domain: str) -> list[str]:
    out = []
    for article, word in WORDS[domain]:  # the reference concatenates the three 22-template lists
        for pat in PATTERNS:
            out.append(pat.replace("A W", f"{article} {word}").replace("W", word))
    return out


def expected_sentences(name: str, domain: str, states: list[str]) -> list[str]:
    return [t.format(s.format(name)) for t in expected_templates(domain) for s in states]


def test_template_counts_and_articles():
    for domain in ("object", "texture"):
        tpl = templates(domain)
        assert len(tpl) == 66 and len(set(tpl)) == 66
        assert tpl == expected_templates(domain)
    obj = templates("object")
    assert "an industrial photo of a {}" in obj and "an industrial image of the {}" in obj
    assert "a manufacturing image of a {}" in obj
    assert not any(t.startswith("a industrial") or t.startswith("A ") for t in obj)
    tex = templates("texture")
    assert "a textural photo of a {}" in tex and "a surface picture of the {} for anomaly detection" in tex


def test_object_class_bottle():
    s = state_sentences("bottle")
    assert s.domain == "object"
    assert len(s.normal) == 462 and len(s.abnormal) == 462
    assert s.normal[0] == "a cropped industrial photo of the normal bottle"
    assert s.normal[1] == "a cropped industrial photo of the flawless bottle"
    assert s.normal[7] == "a cropped industrial photo of a normal bottle"
    assert s.normal[12 * 7] == "an industrial photo of a normal bottle"
    assert s.normal[22 * 7] == "a cropped industrial image of the normal bottle"
    assert s.normal[-1] == "a manufacturing image of a bottle without damage for anomaly detection"
    assert s.abnormal[0] == "a cropped industrial photo of the damaged bottle"
    assert s.abnormal[-1] == "a manufacturing image of a bottle with damage for anomaly detection"
    assert s.normal == expected_sentences("bottle", "object", NORMAL)
    assert s.abnormal == expected_sentences("bottle", "object", ABNORMAL)


def test_texture_class_carpet():
    s = state_sentences("carpet")
    assert s.domain == "texture"
    assert len(s.normal) == 462 and len(s.abnormal) == 462
    assert s.normal[0] == "a cropped industrial photo of the normal carpet"
    assert s.normal[22 * 7] == "a cropped textural photo of the normal carpet"
    assert s.normal[(22 + 12) * 7] == "a textural photo of a normal carpet"
    assert s.normal[-1] == "a surface picture of a carpet without damage for anomaly detection"
    assert s.abnormal[0] == "a cropped industrial photo of the damaged carpet"
    assert s.abnormal[-1] == "a surface picture of a carpet with damage for anomaly detection"
    assert s.normal == expected_sentences("carpet", "texture", NORMAL)
    assert s.abnormal == expected_sentences("carpet", "texture", ABNORMAL)


def test_ordering_for_each_template_for_each_state():
    s = state_sentences("bottle")
    tpl = expected_templates("object")
    for t_idx in (0, 13, 40, 65):
        for s_idx in range(7):
            assert s.normal[t_idx * 7 + s_idx] == tpl[t_idx].format(NORMAL[s_idx].format("bottle"))
            assert s.abnormal[t_idx * 7 + s_idx] == tpl[t_idx].format(ABNORMAL[s_idx].format("bottle"))


@pytest.mark.parametrize("cls", ["carpet", "grid", "leather", "tile", "wood"])
def test_mvtec_textures(cls):
    assert state_sentences(cls).domain == "texture"


@pytest.mark.parametrize("cls", ["macaroni1", "macaroni2"])
def test_macaroni_alias(cls):
    s = state_sentences(cls)
    assert s.normal[0] == "a cropped industrial photo of the normal macaroni"
    assert not any(cls in x for x in s.normal + s.abnormal)
    assert s.normal == state_sentences("macaroni").normal


def test_class_names_used_as_given():
    """The reference formats dataset folder names as they are ('metal_nut', 'pipe_fryum')."""
    s = state_sentences("metal_nut")
    assert s.normal[0] == "a cropped industrial photo of the normal metal_nut"
    assert state_sentences("pcb1").abnormal[-1] == "a manufacturing image of a pcb1 with damage for anomaly detection"


def test_domain_override_and_errors():
    assert state_sentences("bottle", "texture").normal == expected_sentences("bottle", "texture", NORMAL)
    assert (
        state_sentences("carpet", "object").normal[-1]
        == "a manufacturing image of a carpet without damage for anomaly detection"
    )
    with pytest.raises(AnoCLIPError, match="domain"):
        state_sentences("bottle", "fabric")
    with pytest.raises(AnoCLIPError):
        state_sentences("   ")


def test_prototype_is_normalised_mean_of_unnormalised():
    d = 8
    gen = torch.Generator().manual_seed(0)
    sents = StateSentences([f"n{i}" for i in range(5)], [f"a{i}" for i in range(5)], "object")
    # very different norms per sentence, so that mean-of-normalised would give another answer
    raw = torch.randn(10, d, generator=gen) * torch.logspace(-1, 1.5, 10).unsqueeze(1)
    calls = []

    def fake_encode(texts):
        calls.append(list(texts))
        return raw.clone()

    emb = encode_sentences(fake_encode, sents)
    assert calls == [sents.normal + sents.abnormal]
    raw_np = raw.double().numpy()
    for row, part in enumerate((raw_np[:5], raw_np[5:])):
        m = part.mean(0)
        np.testing.assert_allclose(emb.prototypes[row].double().numpy(), m / np.linalg.norm(m), atol=1e-6)
        unit = part / np.linalg.norm(part, axis=1, keepdims=True)
        alt = unit.mean(0) / np.linalg.norm(unit.mean(0))
        assert np.abs(alt - emb.prototypes[row].double().numpy()).max() > 1e-2
    np.testing.assert_allclose(
        emb.sentences.double().numpy(), raw_np / np.linalg.norm(raw_np, axis=1, keepdims=True), atol=1e-6
    )
    assert emb.prototypes.shape == (2, d) and emb.sentences.shape == (10, d)


def test_model_state_embeddings(tiny_model):
    emb = tiny_model.state_embeddings("bottle")
    assert emb.prototypes.shape == (2, 32) and emb.sentences.shape == (924, 32)
    torch.testing.assert_close(emb.prototypes.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(emb.sentences.norm(dim=-1), torch.ones(924))
    # the first sentence embedding is the text tower's output for the first normal sentence
    tok = tiny_model._tokenizer(["a cropped industrial photo of the normal bottle"])
    with torch.no_grad():
        first = F.normalize(tiny_model.clip.encode_text(tok).float(), dim=-1)[0]
    torch.testing.assert_close(emb.sentences[0], first, atol=1e-5, rtol=0)
    assert torch.equal(tiny_model.encode_states("bottle"), emb.prototypes)
    assert not torch.allclose(tiny_model.encode_states("carpet"), emb.prototypes)


def _counting_text_tower(monkeypatch, clip):
    """Count runs of the text transformer (full-context or cut, both go through it)."""
    calls = {"n": 0}
    original = clip.transformer.forward

    def counting(tokens, *args, **kwargs):
        calls["n"] += 1
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(clip.transformer, "forward", counting)
    return calls


def _fresh(tiny_model, cache_dir, weights=None, backbone=None):
    return AnoCLIP(tiny_model.clip, backbone or tiny_model.backbone, weights or tiny_model.weights, cache_dir=cache_dir)


def test_disk_cache_hit_skips_text_tower(tiny_model, tmp_path, monkeypatch):
    calls = _counting_text_tower(monkeypatch, tiny_model.clip)
    first = _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    assert calls["n"] > 0
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("text tower called although the disk cache holds this class")

    monkeypatch.setattr(tiny_model.clip.transformer, "forward", boom)
    second = _fresh(tiny_model, tmp_path).state_embeddings("bottle")  # new instance: empty memory cache
    assert torch.equal(first.prototypes, second.prototypes)
    assert torch.equal(first.sentences, second.sentences)
    assert second.domain == "object"


def test_disk_cache_key_components(tiny_model, tmp_path, monkeypatch):
    calls = _counting_text_tower(monkeypatch, tiny_model.clip)
    _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    n_after_first = calls["n"]
    _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    assert calls["n"] == n_after_first  # hit

    other_weights = WeightsInfo("/x/w.pt", "file", "ab" * 32, False)
    variants = [
        dict(weights=other_weights),  # other weights
        dict(backbone="anoclip-tiny-other-name"),  # other backbone
    ]
    for kw in variants:
        before = calls["n"]
        _fresh(tiny_model, tmp_path, **kw).state_embeddings("bottle")
        assert calls["n"] > before, kw
    before = calls["n"]
    _fresh(tiny_model, tmp_path).state_embeddings("screw")  # other class
    assert calls["n"] > before
    before = calls["n"]
    _fresh(tiny_model, tmp_path).state_embeddings("bottle", "texture")  # other domain
    assert calls["n"] > before
    assert len(list(tmp_path.glob("*.npz"))) == 5

    keys = {
        PromptCache.key("b", "w", "c", "object"),
        PromptCache.key("b2", "w", "c", "object"),
        PromptCache.key("b", "w2", "c", "object"),
        PromptCache.key("b", "w", "c2", "object"),
        PromptCache.key("b", "w", "c", "texture"),
    }
    assert len(keys) == 5
    assert PromptCache.key("b", "w", "c", "object") == PromptCache.key("b", "w", "c", "object")


def test_corrupt_cache_file_is_recomputed(tiny_model, tmp_path, monkeypatch):
    ref = _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz")
    calls = _counting_text_tower(monkeypatch, tiny_model.clip)
    again = _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    assert calls["n"] > 0
    torch.testing.assert_close(again.prototypes, ref.prototypes)


def test_memory_cache(tiny_model, monkeypatch):
    model = _fresh(tiny_model, None)
    model.state_embeddings("bottle")
    calls = _counting_text_tower(monkeypatch, tiny_model.clip)
    model.state_embeddings("bottle")
    assert calls["n"] == 0


def test_text_is_encoded_in_float32_under_autocast(tiny_model, tmp_path):
    """Text embeddings go to a disk cache (and into export artifacts) under a key without the
    precision: a first call made inside bf16 autocast must not store bf16-accurate embeddings."""
    ref = _fresh(tiny_model, None).state_embeddings("bottle")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fresh(tiny_model, tmp_path).state_embeddings("bottle")
    assert got.sentences.dtype == torch.float32
    torch.testing.assert_close(got.sentences, ref.sentences, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.prototypes, ref.prototypes, atol=1e-6, rtol=0)
    cached = _fresh(tiny_model, tmp_path).state_embeddings("bottle")  # from disk
    torch.testing.assert_close(cached.sentences, ref.sentences, atol=1e-6, rtol=0)


def test_grammar_is_torch_free_and_the_sentence_count_derives_from_it():
    """ALGORITHM.md §3: 22 patterns x 3 domain words x 7 states = 462 sentences per state."""
    import subprocess
    import sys

    code = ("import sys; import anoclip_core.prompt_grammar as g, anoclip_core.choices as c; "
            "assert 'torch' not in sys.modules; print(g.SENTENCES_PER_STATE, ','.join(c.DOMAINS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["462", "object,texture"]
    from anoclip_core.prompt_grammar import SENTENCES_PER_STATE, state_sentences

    assert (
        len(state_sentences("bottle").normal)
        == len(state_sentences("carpet", "texture").abnormal)
        == SENTENCES_PER_STATE
    )


def test_cli_choices_come_from_the_choice_enums():
    """One source: the export CLI offers exactly the enums' values (adding one is one edit)."""
    import click

    from anoclip.export.cli import add_class_cmd, export_cmd
    from anoclip_core.choices import DOMAINS, Exporter, Int8Mode, values

    opts = {p.name: p for p in export_cmd.params}
    assert tuple(opts["exporter"].type.choices) == values(Exporter) == ("dynamo", "legacy")
    assert tuple(opts["int8_mode"].type.choices) == values(Int8Mode) == ("dynamic", "static")
    assert isinstance(opts["opset"].default, int) and opts["opset"].default == 18
    assert opts["trt_profile"].default == "1,8,32"
    dom = {p.name: p for p in add_class_cmd.params}["domain"]
    assert isinstance(dom.type, click.Choice) and tuple(dom.type.choices) == DOMAINS
