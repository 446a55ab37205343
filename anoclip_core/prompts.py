"""Unified domain-aware contrastive state prompts (ALGORITHM.md §3) and their on-disk cache."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AnoCLIPError

PROMPT_SET = "anoclip-v1"

NORMAL_STATES = (
    "normal {}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)

_PATTERNS = (
    "a cropped W of the {}", "a cropped W of a {}", "a close-up W of a {}", "a close-up W of the {}",
    "a bright W of a {}", "a bright W of the {}", "a dark W of the {}", "a dark W of a {}",
    "a jpeg corrupted W of a {}", "a jpeg corrupted W of the {}", "a blurry W of the {}",
    "a blurry W of a {}", "A W of a {}", "A W of the {}", "A W of a small {}", "A W of the small {}",
    "A W of a large {}", "A W of the large {}", "A W of the {} for visual inspection",
    "A W of a {} for visual inspection", "A W of the {} for anomaly detection",
    "A W of a {} for anomaly detection",
)

DOMAIN_WORDS = {
    "object": ("industrial photo", "industrial image", "manufacturing image"),
    "texture": ("industrial photo", "textural photo", "surface picture"),
}

MVTEC_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
CLASS_ALIASES = {"macaroni1": "macaroni", "macaroni2": "macaroni"}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def templates(domain: str) -> list[str]:
    """The 66 templates of a domain, in reference order: medium-word-major (the 22 patterns with
    the first word, then with the second, then the third), as the reference's
    ``inds_temp + img_temp + mnf_temp`` / ``inds_temp + text_temp + surf_temp``."""
    if domain not in DOMAIN_WORDS:
        raise AnoCLIPError(f"unknown prompt domain {domain!r} (expected one of {sorted(DOMAIN_WORDS)})")
    out: list[str] = []
    for word in DOMAIN_WORDS[domain]:
        for pat in _PATTERNS:
            if pat.startswith("A W"):
                out.append(f"{_article(word)} {word}" + pat[3:])
            else:
                out.append(pat.replace("W", word))
    return out


def default_domain(class_name: str) -> str:
    """MVTec textures are 'texture', every other class an 'object'."""
    return "texture" if class_name in MVTEC_TEXTURES else "object"


def prompt_name(class_name: str) -> str:
    """The class name as written in the prompts: as given (the reference formats the folder name,
    underscores included, e.g. 'metal_nut'), except macaroni1/2 -> 'macaroni'."""
    return CLASS_ALIASES.get(class_name, class_name)


@dataclass(frozen=True)
class StateSentences:
    normal: list[str]
    abnormal: list[str]
    domain: str


def state_sentences(class_name: str, domain: str | None = None) -> StateSentences:
    """462 normal and 462 abnormal sentences: for each template, for each state."""
    if not class_name or not class_name.strip():
        raise AnoCLIPError("class name must be a non-empty string")
    dom = domain or default_domain(class_name)
    name = prompt_name(class_name)
    tpl = templates(dom)
    normal = [t.format(s.format(name)) for t in tpl for s in NORMAL_STATES]
    abnormal = [t.format(s.format(name)) for t in tpl for s in ABNORMAL_STATES]
    return StateSentences(normal, abnormal, dom)


@dataclass(frozen=True)
class StateEmbeddings:
    """Text side of one class: prototypes [2, D] (normal, abnormal) and sentences [924, D]."""

    prototypes: torch.Tensor
    sentences: torch.Tensor
    domain: str


def encode_sentences(
    encode_text: Callable[[Sequence[str]], torch.Tensor],
    sents: StateSentences,
) -> StateEmbeddings:
    """Prototype = normalise(mean of UNnormalised sentence embeddings); sentences kept normalised."""
    n = len(sents.normal)
    emb = encode_text(sents.normal + sents.abnormal).float()
    normal, abnormal = emb[:n], emb[n:]
    protos = torch.stack([normal.mean(0), abnormal.mean(0)])
    return StateEmbeddings(F.normalize(protos, dim=-1), F.normalize(emb, dim=-1), sents.domain)


class PromptCache:
    """Text embeddings on disk, keyed by backbone + weights + class + prompt set + domain."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(backbone: str, weights_id: str, class_name: str, domain: str, image_size: int | None = None) -> str:
        payload = json.dumps([PROMPT_SET, backbone, weights_id, class_name, domain], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"text-{key}.npz"

    def load(self, key: str) -> StateEmbeddings | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return StateEmbeddings(
                    torch.from_numpy(data["prototypes"].copy()),
                    torch.from_numpy(data["sentences"].copy()),
                    str(data["domain"]),
                )
        except (OSError, KeyError, ValueError):
            return None

    def save(self, key: str, emb: StateEmbeddings) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            prototypes=emb.prototypes.cpu().numpy(),
            sentences=emb.sentences.cpu().numpy(),
            domain=np.array(emb.domain),
        )
        os.replace(tmp, path)


def default_cache_dir() -> Path:
    """$ANOCLIP_CACHE, else ~/.cache/anoclip/text."""
    env = os.environ.get("ANOCLIP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "anoclip" / "text"
