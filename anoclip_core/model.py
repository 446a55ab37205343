"""``AnoCLIP``: the front door of the core (factory, encoders, prompts, prediction)."""
from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import transform
from .encoder import DualPathEncoder
from .errors import InputError, ModelError
from .fileio import sha256_file
from .prompts import PromptCache, StateEmbeddings, default_cache_dir, encode_sentences, state_sentences
from .refbank import (
    DEFAULT_CHUNK,
    DEFAULT_VISUAL_WEIGHT,
    ReferenceBank,
    check_weight,
    coverage_radius,
    fuse,
    fuse_image_score,
    greedy_coreset,
)
from .scores import anomaly_map, image_views, smooth, state_probs, upsample, visual_anomaly
from .text_tower import encode_text_truncated
from .tta import TTAConfig, adapt_tokens

log = logging.getLogger("anoclip")

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS (--pretrained none): outputs are NOT meaningful anomaly scores"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
TEXT_BATCH = 128
IMAGE_BATCH = 8  # good images encoded per forward when building a reference bank


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from: ``source`` is a tag, a file path or ``"none"``."""

    source: str
    kind: str
    sha256: str | None
    random_weights: bool

    @property
    def cache_id(self) -> str:
        if self.kind == "file":
            return f"file:{self.sha256}"
        if self.kind == "tag":
            return f"tag:{self.source}"
        import open_clip

        return f"random:seed0:torch{torch.__version__}:open_clip{open_clip.__version__}"


def _check_backbone(backbone: str) -> None:
    import open_clip

    models = open_clip.list_models()
    if backbone not in models:
        close = difflib.get_close_matches(backbone, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown backbone {backbone!r}{hint}; see open_clip.list_models()")


def resolve_weights(backbone: str, pretrained: str | os.PathLike | None) -> WeightsInfo:
    """Classify ``pretrained`` as none / local file / open_clip tag, with clear errors."""
    import open_clip

    if pretrained is None or str(pretrained).lower() in ("", "none", "random"):
        return WeightsInfo("none", "none", None, True)
    text = os.fspath(pretrained)
    if os.path.isfile(text):
        return WeightsInfo(os.path.abspath(text), "file", sha256_file(text), False)
    if os.sep in text or text.endswith(WEIGHT_SUFFIXES):
        raise ModelError(f"weights file not found: {text}")
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if text not in tags:
        listed = ", ".join(tags) if tags else "none published"
        raise ModelError(
            f"unknown pretrained tag {text!r} for {backbone} (known tags: {listed}); "
            "or pass a local weights file, or 'none' for random weights"
        )
    return WeightsInfo(text, "tag", None, False)


def _offline_message(backbone: str, tag: str, why: str) -> str:
    return (
        f"cannot load pretrained weights {backbone}/{tag}: not in the local cache and the download failed "
        f"({why}). Offline? Download once where there is network (it is cached), or pass a "
        f"local weights file with --pretrained /path/to/weights, or use --pretrained none (random weights)"
    )


class _DropOpenClipRootErrors(logging.Filter):
    """open_clip logs a failed download on the root logger (``ERROR:root:...``) before raising;
    our one-line error says it, so that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and f"{os.sep}open_clip{os.sep}" in record.pathname)


def _create_from_tag(backbone: str, tag: str, cache_dir: str | None, kwargs: dict):
    """open_clip model with a pretrained tag; fails in seconds, with one message, when the weights
    are not cached and their host cannot be reached."""
    import open_clip

    from .pretrained import offline_reason

    why = offline_reason(backbone, tag, cache_dir)
    if why:
        raise ModelError(_offline_message(backbone, tag, why))
    quiet = _DropOpenClipRootErrors()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(backbone, pretrained=tag, cache_dir=cache_dir, **kwargs)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - network/hub errors vary by library version
        raise ModelError(_offline_message(backbone, tag, type(err).__name__)) from None
    finally:
        logging.getLogger().removeFilter(quiet)


def _first_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else "(no message)"
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _state_dict_mismatch(text: str) -> str:
    """One-line summary of torch's multi-line ``load_state_dict`` error."""
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (\S+ \S+|\S+) from checkpoint", text)
    if sizes:
        parts.append(f"{len(sizes)} shape mismatches (e.g. {sizes[0][0]})")
    return "; ".join(parts) if parts else _first_line(text)


def create_clip(backbone: str, weights: WeightsInfo, image_size: int | None, cache_dir: str | None = None):
    """Build the open_clip model; random weights are seeded (0) so runs are reproducible.

    A pretrained tag trained with QuickGELU (e.g. ViT-L-14 ``openai``) gets QuickGELU, as
    open_clip's OpenAI loader did for the reference; for a local file of such weights, name the
    ``-quickgelu`` variant of the backbone (e.g. ``ViT-L-14-quickgelu``).
    """
    import open_clip

    kwargs = {"force_image_size": image_size} if image_size else {}
    if weights.kind == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return open_clip.create_model(backbone, pretrained=None, **kwargs)
    if weights.kind == "file":
        try:
            return open_clip.create_model(backbone, pretrained=weights.source, **kwargs)
        except Exception as err:  # noqa: BLE001 - unpickling/format errors from torch/safetensors
            text = str(err)
            if isinstance(err, RuntimeError) and "loading state_dict" in text:
                raise ModelError(
                    f"weights file {weights.source} does not match backbone {backbone}: {_state_dict_mismatch(text)}"
                ) from None
            raise ModelError(
                f"cannot read weights file {weights.source} (corrupt, or not a PyTorch/safetensors checkpoint): "
                f"{type(err).__name__}: {_first_line(text)}"
            ) from None
    if open_clip.get_pretrained_cfg(backbone, weights.source).get("quick_gelu", False):
        kwargs["force_quick_gelu"] = True
    return _create_from_tag(backbone, weights.source, cache_dir, kwargs)


class AnoCLIP(torch.nn.Module):
    """Zero-shot anomaly localization with a dual-path CLIP ViT and state prompts."""

    def __init__(
        self,
        clip_model: torch.nn.Module,
        backbone: str,
        weights: WeightsInfo,
        dual_blocks: int | None = None,
        temperature: float = 1.0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ModelError(f"temperature must be > 0, got {temperature}")
        self.clip = clip_model.eval()
        self.encoder = DualPathEncoder(clip_model.visual, dual_blocks)
        self.backbone = backbone
        self.weights = weights
        self.temperature = float(temperature)
        self.prompt_cache = PromptCache(cache_dir)
        self._states: dict[tuple[str, str], StateEmbeddings] = {}
        import open_clip

        self._tokenizer = open_clip.get_tokenizer(backbone)
        pcfg = open_clip.get_model_preprocess_cfg(clip_model)
        mean = tuple(float(v) for v in pcfg.get("mean", transform.OPENAI_MEAN))
        std = tuple(float(v) for v in pcfg.get("std", transform.OPENAI_STD))
        self.preprocess_config = transform.PreprocessConfig(self.image_size, mean, std)
        if weights.random_weights:
            log.warning(RANDOM_WEIGHTS_WARNING)

    @classmethod
    def create(
        cls,
        backbone: str,
        pretrained: str | os.PathLike | None = None,
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        dual_blocks: int | None = None,
        temperature: float = 1.0,
        cache_dir: str | os.PathLike | None = "default",
        weights_cache_dir: str | None = None,
    ) -> AnoCLIP:
        """Build from an open_clip backbone name and a pretrained tag, a local file, or None.

        ``cache_dir`` holds encoded text prompts (``"default"``: $ANOCLIP_CACHE or
        ~/.cache/anoclip/text; None disables it); ``weights_cache_dir`` is open_clip's.
        """
        _check_backbone(backbone)
        if image_size is not None and int(image_size) < 1:
            raise ModelError(f"image_size must be positive, got {image_size}")
        weights = resolve_weights(backbone, pretrained)
        clip_model = create_clip(backbone, weights, image_size, weights_cache_dir)
        text_cache = default_cache_dir() if cache_dir == "default" else cache_dir
        model = cls(clip_model, backbone, weights, dual_blocks, temperature, text_cache)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return self.encoder.visual.proj.device

    @property
    def image_size(self) -> int:
        return self.encoder.image_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def random_weights(self) -> bool:
        return self.weights.random_weights

    # images -------------------------------------------------------------------------------
    def load_images(self, images: Sequence[transform.ImageLike], channel_order: str = "RGB") -> torch.Tensor:
        """Paths or arrays -> normalised pixels [B, 3, S, S] on the model's device."""
        batch = transform.preprocess_batch(list(images), self.preprocess_config, channel_order)
        return torch.from_numpy(batch).to(self.device)

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Validate a pixel batch (type, shape [B, 3, S, S], float dtype, finite) -> on the model's device.

        Raises ``InputError`` with a one-line message. (The NaN check lives here, not in the
        encoder, so that the encoder stays free of data-dependent branches for ONNX export.)
        """
        self.encoder._check_pixels(pixels)
        if pixels.shape[0] == 0:
            raise InputError("pixels: empty batch (B = 0)")
        if not bool(torch.isfinite(pixels).all()):
            raise InputError("pixels contain NaN or infinite values")
        return pixels.to(self.device)

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected (unnormalised) global [B, D] and local [B, h, w, D] tokens."""
        return self.encoder.forward_tokens(self.check_pixels(pixels))

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised global [B, D] and local [B, h, w, D] embeddings."""
        return self.encoder(self.check_pixels(pixels))

    # text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_text(self, sentences: Sequence[str]) -> torch.Tensor:
        # Always float32, also inside a caller's torch.autocast: the result is cached on disk
        # under a key that does not name the precision, and exported as the artifact's text.
        out = []
        with torch.autocast(device_type=self.device.type, enabled=False):
            for i in range(0, len(sentences), TEXT_BATCH):
                tokens = self._tokenizer(list(sentences[i : i + TEXT_BATCH])).to(self.device)
                out.append(encode_text_truncated(self.clip, tokens).float())
        return torch.cat(out)

    def state_embeddings(self, class_name: str, domain: str | None = None) -> StateEmbeddings:
        """Prototypes and per-sentence embeddings of a class, from memory, disk cache or the text tower."""
        sents = state_sentences(class_name, domain)
        key = (class_name, sents.domain)
        if key in self._states:
            return self._states[key]
        cache_key = PromptCache.key(self.backbone, self.weights.cache_id, class_name, sents.domain)
        emb = self.prompt_cache.load(cache_key)
        if emb is None:
            emb = encode_sentences(self._encode_text, sents)
            self.prompt_cache.save(cache_key, emb)
        emb = StateEmbeddings(emb.prototypes.to(self.device), emb.sentences.to(self.device), emb.domain)
        self._states[key] = emb
        return emb

    def encode_states(self, class_name: str, domain: str | None = None) -> torch.Tensor:
        """State prototypes [2, D] (normal, abnormal), L2-normalised."""
        return self.state_embeddings(class_name, domain).prototypes

    # prediction ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        pixels: torch.Tensor,
        class_name: str,
        tta: bool | TTAConfig = False,
        views: bool = False,
        domain: str | None = None,
        tta_start_index: int = 0,
        references: ReferenceBank | None = None,
        visual_weight: float = DEFAULT_VISUAL_WEIGHT,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] -> anomaly maps [B, S, S] and image scores [B].

        ``references`` (a :class:`~anoclip_core.refbank.ReferenceBank` of this model) turns on
        the few-shot mode: the visual map (1 - max cosine similarity of each un-adapted local
        embedding to the bank, post-processed like the text map) is fused with the text map and
        score by the WinCLIP+ rule of :mod:`anoclip_core.refbank` with weight ``visual_weight``.
        Without it (the default) the zero-shot path runs unchanged.

        ``tta`` runs AnoCLIP+ (True for the default settings, or a ``TTAConfig``); image ``i``
        of the batch adapts with the seed stream ``tta_start_index + i``, so a caller that passes
        the running image index gets results independent of its batch size. ``views``
        averages the image score over the reference's 22 views.

        Under ``torch.autocast`` only the encoder runs in reduced precision; TTA and the scores
        run in float32, and the outputs are always float32.
        """
        pixels = self.check_pixels(pixels)  # before the (possibly slow) text encoding
        if references is not None:
            check_weight(visual_weight)
            references.check_compatible(self.backbone, self.embed_dim, self.image_size)
        states = self.state_embeddings(class_name, domain)
        glob, local = self.encoder.forward_tokens(pixels)
        with torch.autocast(device_type=self.device.type, enabled=False):
            if references is not None:
                visual = self._visual_grid(F.normalize(local.float(), dim=-1), references)
            if tta:
                cfg = tta if isinstance(tta, TTAConfig) else TTAConfig(temperature=self.temperature)
                local = adapt_tokens(local.float(), states.sentences, states.prototypes, cfg,
                                     start_index=tta_start_index)
            local = F.normalize(local.float(), dim=-1)
            size = (self.image_size, self.image_size)
            maps = anomaly_map(local, states.prototypes.float(), size, self.temperature)
            if not views:
                scores = state_probs(F.normalize(glob.float(), dim=-1), states.prototypes.float(), self.temperature)
        if views:
            scores = self.view_scores(pixels, states.prototypes)
        if references is not None:
            with torch.autocast(device_type=self.device.type, enabled=False):
                maps = fuse(maps, upsample(visual, size), visual_weight)
                scores = fuse_image_score(scores, visual.amax(dim=(-2, -1)), visual_weight)
        return maps, scores

    def _visual_grid(self, local: torch.Tensor, bank: ReferenceBank) -> torch.Tensor:
        """Smoothed visual anomaly grid [B, h, w] of normalised local embeddings against ``bank``."""
        refs = torch.from_numpy(bank.embeddings).to(self.device)
        return smooth(visual_anomaly(local, refs, DEFAULT_CHUNK))

    # reference bank -----------------------------------------------------------------------
    @torch.no_grad()
    def reference_embeddings(self, pixels: torch.Tensor, batch_size: int = 8) -> np.ndarray:
        """Normalised pixels [B, 3, S, S] -> their L2-normalised V-V local embeddings [B * h * w, D]
        (what the exported graph outputs as ``local_embeddings``), float32 on the host."""
        pixels = self.check_pixels(pixels)
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            _, local = self.encoder(pixels[i : i + batch_size])
            out.append(local.float().reshape(-1, local.shape[-1]).cpu().numpy())
        return np.concatenate(out)

    def build_references(
        self,
        images: Sequence[transform.ImageLike],
        names: Sequence[str] | None = None,
        coreset_size: int | None = None,
        seed: int = 0,
        source: str = "",
        pixels: torch.Tensor | None = None,
    ) -> ReferenceBank:
        """Encode good images into a :class:`ReferenceBank`, optionally reduced by PatchCore's
        greedy coreset to ``coreset_size`` patches (``seed`` picks its start point).

        ``names`` default to the file names of path images; ``pixels`` (normalised, e.g. VisA's two
        crops per image) replaces loading ``images`` the plain S x S way.
        """
        if not images:
            raise InputError("no good images to build a reference bank from")
        names = list(names) if names is not None else [_image_name(im, i) for i, im in enumerate(images)]
        if pixels is None:
            feats = np.concatenate([self.reference_embeddings(self.load_images(images[i : i + IMAGE_BATCH]))
                                    for i in range(0, len(images), IMAGE_BATCH)])
        else:
            feats = self.reference_embeddings(pixels)
        coreset = None
        if coreset_size is not None and coreset_size < feats.shape[0]:
            idx = greedy_coreset(feats, coreset_size, seed)
            coreset = {"size": int(coreset_size), "seed": int(seed), "projection_dim": None,
                       "radius": coverage_radius(feats, idx)}
            patches, feats = feats.shape[0], feats[idx]
        else:
            patches = feats.shape[0]
        return ReferenceBank(feats, self.backbone, self.image_size, self.grid_size, tuple(names), source,
                             int(patches), coreset)

    @torch.no_grad()
    def view_scores(self, pixels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Image scores [B] averaged over the 22 reference views (one batched forward)."""
        v = image_views(self.check_pixels(pixels))
        n, b = v.shape[:2]
        glob, _ = self.encoder(v.reshape(n * b, *v.shape[2:]))
        with torch.autocast(device_type=self.device.type, enabled=False):
            glob = F.normalize(glob.float(), dim=-1)
            probs = state_probs(glob, prototypes.float(), self.temperature).reshape(n, b)
        return probs.mean(0)

    def predict_images(
        self, images: Sequence[transform.ImageLike], class_name: str, tta: bool | TTAConfig = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Convenience: paths/arrays -> (maps [B, S, S], scores [B]) as numpy."""
        maps, scores = self.predict(self.load_images(images), class_name, tta=tta)
        return maps.cpu().numpy(), scores.cpu().numpy()


def _image_name(image: transform.ImageLike, index: int) -> str:
    """A path's file name, or ``array_<index>`` for an in-memory image."""
    return Path(os.fspath(image)).name if isinstance(image, (str, os.PathLike)) else f"array_{index}"


def register_model_configs(path: str | os.PathLike) -> None:
    """Register extra open_clip model configs (a JSON file or a folder of them)."""
    import open_clip

    p = Path(path)
    if not p.exists():
        raise ModelError(f"model config path not found: {p}")
    for f in ([p] if p.is_file() else sorted(p.glob("*.json"))):
        _check_model_config(f)
    open_clip.add_model_config(p)


def _check_model_config(f: Path) -> None:
    """A model config must be a JSON object with open_clip's three keys (else it is skipped silently)."""
    import json

    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"model config {f} is not valid JSON: {err}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ModelError(f"model config {f} lacks {', '.join(missing)} (an open_clip model config is needed)")
