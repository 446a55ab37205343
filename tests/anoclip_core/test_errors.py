"""Bad input: each a clear one-line error of the right type."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from anoclip_core import AnoCLIP
from anoclip_core.errors import AnoCLIPError, InputError, ModelError
from anoclip_core.model import register_model_configs


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


BAD_PIXELS = [
    (torch.randn(1, 3, 32, 32), r"\[B, 3, 64, 64\].*\[1, 3, 32, 32\]"),  # wrong size
    (torch.randn(1, 3, 64, 48), r"\[B, 3, 64, 64\]"),  # not square
    (torch.randn(2, 1, 64, 64), r"\[B, 3, 64, 64\].*\[2, 1, 64, 64\]"),  # one channel
    (torch.randn(2, 4, 64, 64), r"\[B, 3, 64, 64\]"),  # four channels
    (torch.randn(3, 64, 64), r"\[B, 3, 64, 64\]"),  # no batch dimension
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating-point"),  # raw uint8
    (torch.zeros(1, 3, 64, 64, dtype=torch.int64), "floating-point"),
    (np.zeros((1, 3, 64, 64), np.float32), "torch.Tensor"),  # numpy instead of a tensor
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    (torch.zeros(0, 3, 64, 64), "empty"),
]


@pytest.mark.parametrize("pixels,match", BAD_PIXELS)
def test_encode_image_bad_pixels(tiny_model, pixels, match):
    with pytest.raises(InputError, match=match) as info:
        tiny_model.encode_image(pixels)
    _one_line(info)
    with pytest.raises(InputError, match=match):
        tiny_model.encode_tokens(pixels)


@pytest.mark.parametrize("pixels,match", BAD_PIXELS)
def test_predict_bad_pixels_fail_before_text_encoding(tiny_model, monkeypatch, pixels, match):
    """A bad batch is refused before the (for real backbones: minutes of) text encoding."""
    fresh = AnoCLIP(tiny_model.clip, tiny_model.backbone, tiny_model.weights, cache_dir=None)

    def no_text(*args, **kwargs):
        raise AssertionError("text tower called before the input was validated")

    monkeypatch.setattr(tiny_model.clip.transformer, "forward", no_text)
    with pytest.raises(InputError, match=match) as info:
        fresh.predict(pixels, "bottle")
    _one_line(info)
    with pytest.raises(InputError, match=match):
        fresh.predict(pixels, "bottle", tta=True, views=True)


def test_bad_images_to_load_images(tiny_model, tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        tiny_model.load_images([tmp_path / "nope.png"])
    _one_line(info)
    with pytest.raises(InputError, match="shape"):
        tiny_model.load_images([np.zeros((10, 10, 2), np.uint8)])
    with pytest.raises(InputError, match="dtype"):
        tiny_model.load_images([np.zeros((10, 10, 3), np.int32)])


def test_unknown_backbone_with_suggestion():
    for typo in ("vit-b-16-plus-240", "ViT-B-16-plus-24"):
        with pytest.raises(ModelError, match=rf"unknown backbone '{typo}'.*did you mean.*ViT-B-16-plus-240") as info:
            AnoCLIP.create(typo, pretrained=None)
        _one_line(info)
    with pytest.raises(ModelError, match=r"did you mean.*ViT-L-14-336"):
        AnoCLIP.create("ViT-L-14-366", pretrained=None)
    with pytest.raises(ModelError, match="unknown backbone 'no-such-model'") as info:
        AnoCLIP.create("no-such-model", pretrained=None)
    _one_line(info)


def test_unknown_pretrained_tag():
    with pytest.raises(ModelError, match=r"unknown pretrained tag 'laion_bogus'.*known tags:.*openai") as info:
        AnoCLIP.create("ViT-B-16", pretrained="laion_bogus")
    _one_line(info)


@pytest.mark.parametrize("name", ["missing.pt", "sub/dir/missing.bin", "missing.safetensors"])
def test_missing_weights_file(register_tiny, tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(ModelError, match="weights file not found") as info:
        AnoCLIP.create(register_tiny, pretrained=path)
    assert path in _one_line(info)


def test_weights_file_for_another_backbone(register_tiny, tiny24_model, tmp_path):
    path = tmp_path / "tiny24.pt"
    torch.save(tiny24_model.clip.state_dict(), path)
    with pytest.raises(ModelError, match=rf"weights file .*tiny24.pt does not match backbone {register_tiny}") as info:
        AnoCLIP.create(register_tiny, pretrained=str(path))
    msg = _one_line(info)
    assert "unexpected keys" in msg and "resblocks.2" in msg  # says what is wrong, not just "Error(s)"


def test_weights_file_with_wrong_shapes(register_tiny, tiny_model, tmp_path):
    state = dict(tiny_model.clip.state_dict())
    state["visual.proj"] = torch.randn(64, 16)
    path = tmp_path / "wrong-shape.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"does not match backbone.*1 shape mismatches \(e.g. visual.proj\)") as info:
        AnoCLIP.create(register_tiny, pretrained=str(path))
    _one_line(info)


@pytest.mark.parametrize("kind", ["random-bytes", "truncated"])
def test_unreadable_weights_file(register_tiny, tiny_model, tmp_path, kind):
    path = tmp_path / "bad.pt"
    if kind == "random-bytes":
        path.write_bytes(os.urandom(256))
    else:
        torch.save(tiny_model.clip.state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot read weights file .*bad.pt") as info:
        AnoCLIP.create(register_tiny, pretrained=str(path))
    _one_line(info)


def test_offline_tag_not_cached(tmp_path, monkeypatch):
    """A real backbone + tag, HF offline, empty cache: clear ModelError, and fast (open_clip 3.x
    resolves the download before it builds the 200M-parameter model)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "weights"
    empty.mkdir()
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"(?i)offline.*--pretrained") as info:
        AnoCLIP.create("ViT-B-16-plus-240", pretrained="laion400m_e32", weights_cache_dir=str(empty), cache_dir=None)
    elapsed = time.perf_counter() - t0
    msg = _one_line(info)
    assert "ViT-B-16-plus-240/laion400m_e32" in msg
    assert elapsed < 30, f"offline failure took {elapsed:.1f} s (model built before the download?)"
    assert not any(empty.rglob("*.bin")) and not any(empty.rglob("*.safetensors"))


def test_bad_factory_arguments(register_tiny, tmp_path):
    with pytest.raises(ModelError, match="image_size"):
        AnoCLIP.create(register_tiny, pretrained=None, image_size=0)
    with pytest.raises(ModelError, match="temperature"):
        AnoCLIP.create(register_tiny, pretrained=None, temperature=-1.0, cache_dir=None)
    with pytest.raises(ModelError, match="not found"):
        register_model_configs(tmp_path / "no-configs")


def test_bad_class_name(tiny_model):
    with pytest.raises(AnoCLIPError, match="class name"):
        tiny_model.predict(torch.zeros(1, 3, 64, 64), "")
    with pytest.raises(AnoCLIPError, match="domain"):
        tiny_model.predict(torch.zeros(1, 3, 64, 64), "bottle", domain="fabric")


def test_errors_are_value_errors():
    """CLIs catch AnoCLIPError; callers that catch ValueError keep working."""
    for cls in (InputError, ModelError):
        assert issubclass(cls, AnoCLIPError) and issubclass(cls, ValueError)
