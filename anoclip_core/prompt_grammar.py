"""The prompt grammar (ALGORITHM.md §3) as plain data: domains, templates, states, sentences.

Torch-free, so the CLIs, the manifest and the runtime read the prompt domains and the sentence
count from here; ``anoclip_core.prompts`` encodes the sentences with a text tower.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def sentences_per_state() -> int:
    """Sentences per state and class, derived from the grammar (templates x states; 66 x 7 = 462)."""
    counts = {len(templates(d)) * len(NORMAL_STATES) for d in DOMAIN_WORDS}
    if len(counts) != 1 or len(NORMAL_STATES) != len(ABNORMAL_STATES):
        raise AssertionError("every domain and state must give the same number of sentences")
    return counts.pop()


DOMAINS: tuple[str, ...] = tuple(DOMAIN_WORDS)
SENTENCES_PER_STATE: int = sentences_per_state()
