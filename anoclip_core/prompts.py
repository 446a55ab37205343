"""Unified domain-aware contrastive state prompts (ALGORITHM.md §3) and their on-disk cache."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .prompt_grammar import (  # noqa: F401  (re-exported: the grammar's public names)
    ABNORMAL_STATES,
    CLASS_ALIASES,
    DOMAIN_WORDS,
    DOMAINS,
    MVTEC_TEXTURES,
    NORMAL_STATES,
    PROMPT_SET,
    SENTENCES_PER_STATE,
    StateSentences,
    default_domain,
    prompt_name,
    state_sentences,
    templates,
)


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
