"""Pretrained tags trained with QuickGELU must be built with it (the reference's OpenAI loader did)."""
from __future__ import annotations

import pytest

from anoclip_core.model import WeightsInfo, create_clip


@pytest.mark.parametrize(
    "backbone, tag, expected",
    [("ViT-L-14", "openai", True), ("ViT-L-14-336", "openai", True), ("ViT-B-16-plus-240", "laion400m_e32", False)],
)
def test_tag_quick_gelu_is_forced(monkeypatch: pytest.MonkeyPatch, backbone: str, tag: str, expected: bool) -> None:
    import open_clip

    seen: dict = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        return "model"

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr("anoclip_core.pretrained.offline_reason", lambda *a, **k: None)  # weights "cached"
    assert create_clip(backbone, WeightsInfo(tag, "tag", None, False), None) == "model"
    assert seen["name"] == backbone and seen["pretrained"] == tag
    assert seen.get("force_quick_gelu", False) is expected
