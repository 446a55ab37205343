"""An uncached pretrained tag with its host unreachable fails in seconds with our one line, not
after ~46 s of huggingface_hub retries and library log lines (issue 10 item 7)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anoclip_core.errors import ModelError

HF_HOST = "huggingface.co"


def _hf_reachable() -> bool:
    try:
        with socket.create_connection((HF_HOST, 443), timeout=3):
            return True
    except OSError:
        return False


needs_no_network = pytest.mark.skipif(_hf_reachable(), reason=f"{HF_HOST} is reachable: the offline path is not")


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The real network (no HF_HUB_OFFLINE shortcut) and an empty weights cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONWARNINGS="ignore")
    return env


@needs_no_network
def test_export_of_uncached_tag_offline_is_fast_and_one_line(tmp_path: Path):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from anoclip.export.cli import main as m; m()",
            "--backbone",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--classes",
            "bottle",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_offline_env(tmp_path),
    )
    elapsed = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "ViT-B-32/openai" in lines[0] and "--pretrained /path/to/weights" in lines[0]
    assert f"{HF_HOST} unreachable" in lines[0]
    # the whole run, torch and open_clip imports included; the download retries alone took ~46 s
    assert elapsed < 30, f"took {elapsed:.1f} s"


@needs_no_network
def test_uncached_tag_offline_fails_in_seconds(tmp_path: Path, monkeypatch):
    from anoclip_core import AnoCLIP

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # the conftest default: the real network here
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=f"{HF_HOST} unreachable"):
        AnoCLIP.create("ViT-B-32", pretrained="openai", weights_cache_dir=str(tmp_path / "empty"), cache_dir=None)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_probe_gives_up_on_a_silent_host():
    from anoclip_core.pretrained import reachable

    # TEST-NET-1 (RFC 5737) is never routed: a connection there gets no answer at all
    t0 = time.perf_counter()
    assert reachable("https://192.0.2.1/x", timeout_s=0.5) is False
    assert time.perf_counter() - t0 < 3


def test_probe_sees_a_listening_host():
    from anoclip_core.pretrained import reachable

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert reachable(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout_s=2) is True
