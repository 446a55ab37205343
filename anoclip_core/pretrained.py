"""Pretrained tags: is the weights file cached, and can its host be reached at all?

``open_clip.create_model(pretrained=TAG)`` downloads the weights when they are not cached, and
offline it spends some 46 s in huggingface_hub's retries, printing library log lines, before it
fails. We look in the caches first (the Hugging Face hub cache, or open_clip's URL cache), and
when the file is not there, probe the download host (or the configured HTTPS proxy) once with a
short timeout, so that an offline machine gets our one-line error in seconds.

Standard library only at import time; ``open_clip`` and ``huggingface_hub`` are imported lazily.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any

PROBE_TIMEOUT_S = 2.0
HF_ENDPOINT = "https://huggingface.co"


def _pretrained_cfg(backbone: str, tag: str) -> dict[str, Any]:
    try:
        import open_clip

        return dict(open_clip.get_pretrained_cfg(backbone, tag) or {})
    except Exception:  # noqa: BLE001 - an unknown backbone/tag is reported elsewhere
        return {}


def _uses_hf_hub(cfg: dict[str, Any]) -> bool:
    """open_clip's own choice: the hub when the entry has one and huggingface_hub is installed."""
    if not cfg.get("hf_hub"):
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def cached_tag_file(backbone: str, tag: str, cache_dir: str | None = None) -> str | None:
    """open_clip's cached weights file for a tag (HF hub cache or URL cache), if present."""
    cfg = _pretrained_cfg(backbone, tag)
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        # 'org/model/' (default file names) or 'org/model/file.bin', as open_clip reads it
        model_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache

            for name in names:
                path = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
                if isinstance(path, str) and os.path.isfile(path):
                    return path
        except Exception:  # noqa: BLE001 - no hub library or an unreadable cache: not cached
            pass
    url = cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def download_url(backbone: str, tag: str) -> str | None:
    """The address open_clip would download the tag's weights from (None: nothing to download)."""
    cfg = _pretrained_cfg(backbone, tag)
    if cfg.get("file"):
        return None
    if _uses_hf_hub(cfg):
        return os.environ.get("HF_ENDPOINT", HF_ENDPOINT)
    return cfg.get("url") or None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or to the HTTPS proxy, when one is configured)
    opens within ``timeout_s``; name resolution included (it runs in a thread we stop waiting for)."""
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or url)
    host = target.hostname
    if not host:
        return True  # not a network address: let the library decide
    port = target.port or (443 if target.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                ok.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, name="anoclip-weights-probe", daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)
    return bool(ok)


def offline_reason(backbone: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Why the tag's weights cannot be had now (not cached and no network), else None."""
    if cached_tag_file(backbone, tag, cache_dir):
        return None
    url = download_url(backbone, tag)
    if url is None:
        return None
    cfg = _pretrained_cfg(backbone, tag)
    if _uses_hf_hub(cfg) and _hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not reachable(url):
        return f"{urllib.parse.urlsplit(url).hostname} unreachable"
    return None
