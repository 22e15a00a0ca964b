"""The one encoder loader: `ARCH:PRETRAINED` -> a CLIP model with both towers.

PRETRAINED is an open_clip pretrained tag (`ViT-B-32:openai`), a path to a local
checkpoint (`ViT-B-32:/models/vitb32.pt`), or `random` (seeded random init, for tests
and benchmarks only). Offline, a tag whose weights are not cached fails at once with
one line saying how to supply them; nothing ever falls back to random weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xm.errors import XMError

RANDOM = "random"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_configs_registered = False
_cache_lock = threading.Lock()
_loaded: dict[str, "Encoder"] = {}
# The probe text's embedding identifies the weights: an index built with other
# weights under the same name is caught at load time, cheaply.
PROBE_TEXT = "a photo of a dog."


@dataclass(frozen=True)
class EncoderSpec:
    arch: str
    pretrained: str

    @classmethod
    def parse(cls, text: str) -> "EncoderSpec":
        text = text.strip()
        arch, sep, pretrained = text.partition(":")
        if not sep or not arch or not pretrained:
            raise XMError(
                f"encoder {text!r}: expected ARCH:PRETRAINED, e.g. ViT-B-32:openai, "
                "ViT-B-32:/path/to/checkpoint.pt or ViT-B-32:random"
            )
        return cls(arch, pretrained)

    @property
    def is_random(self) -> bool:
        return self.pretrained == RANDOM

    @property
    def is_path(self) -> bool:
        return os.sep in self.pretrained or Path(self.pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}

    def __str__(self) -> str:
        return f"{self.arch}:{self.pretrained}"

    @property
    def slug(self) -> str:
        """A file-system-safe name for this encoder."""
        tag = Path(self.pretrained).stem if self.is_path else self.pretrained
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{self.arch}_{tag}")


def _register_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _configs_registered = True


def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_weights(arch: str, tag: str, cache_dir: str | None) -> str | None:
    """Path of the cached weights for an open_clip tag, or None when not cached."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    hf = cfg.get("hf_hub", "")
    if hf:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hf)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for name in candidates:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def availability_problem(spec: EncoderSpec | str, cache_dir: str | None = None) -> str | None:
    """Why `spec` cannot be loaded here (one line), or None; loads nothing."""
    _register_configs()
    try:
        _check_available(EncoderSpec.parse(spec) if isinstance(spec, str) else spec, cache_dir)
    except XMError as exc:
        return str(exc)
    return None


def _check_available(spec: EncoderSpec, cache_dir: str | None) -> None:
    import open_clip

    if spec.arch not in open_clip.list_models():
        raise XMError(f"encoder {spec}: unknown architecture {spec.arch!r} (see open_clip.list_models())")
    if spec.is_random:
        return
    if spec.is_path:
        if not Path(spec.pretrained).is_file():
            raise XMError(f"encoder {spec}: checkpoint file {spec.pretrained} does not exist")
        return
    if spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.arch):
        raise XMError(
            f"encoder {spec}: {spec.pretrained!r} is neither an open_clip pretrained tag for {spec.arch} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(spec.arch)) or 'none'}), a checkpoint path, nor 'random'"
        )
    if _cached_weights(spec.arch, spec.pretrained, cache_dir) is None and not _hub_reachable():
        hub = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        raise XMError(
            f"encoder {spec}: weights are not in the local cache and the hub is unreachable; "
            f"supply them offline as {spec.arch}:/path/to/checkpoint.pt, or copy the Hugging Face "
            f"cache from a connected machine into {hub}/hub"
        )


class Encoder:
    """A loaded CLIP model: normalised image and text embeddings as float32 numpy arrays."""

    def __init__(self, spec: EncoderSpec, model: Any, preprocess: Callable, tokenizer: Callable) -> None:
        import torch

        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        self._truncatable = _has_causal_eot_text(model)
        with torch.inference_mode():
            self.dim = int(self.encode_texts([PROBE_TEXT]).shape[1])
        self.image_size = getattr(getattr(model, "visual", None), "image_size", None)

    def __repr__(self) -> str:
        return f"Encoder({self.spec}, dim={self.dim})"

    def probe(self) -> list[float]:
        """The first 8 dims of the probe text's embedding: a cheap weights fingerprint."""
        return [round(float(v), 5) for v in self.encode_texts([PROBE_TEXT])[0, :8]]

    def fingerprint_matches(self, probe: Sequence[float], tol: float = 2e-3) -> bool:
        return bool(np.allclose(self.probe(), np.asarray(probe, dtype=np.float64), atol=tol))

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """Image embeddings of an already preprocessed batch (N,3,H,W tensor)."""
        import torch

        with torch.inference_mode():
            feats = self.model.encode_image(pixels)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.numpy()

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Image embeddings of PIL images (already RGB; see `load_image`)."""
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.encode_pixels(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Normalised text embeddings; captions are batched by token length (see `_encode_tokens`)."""
        return self.encode_texts_with_norms(texts, batch_size)[0]

    def encode_texts_with_norms(self, texts: Sequence[str], batch_size: int = 256,
                                on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(normalised text embeddings, their norms before normalisation): the norms are what
        X-MoRe's raw-dot re-ranking needs, stored at build time so nothing is re-encoded."""
        import torch

        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32), np.zeros(0, np.float32)
        tokens = self.tokenizer(list(texts))
        order = torch.argsort((tokens != 0).sum(1), stable=True) if self._truncatable else torch.arange(len(texts))
        out = np.empty((len(texts), 0), np.float32)
        norms = np.empty(len(texts), np.float32)
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                raw = self._encode_tokens(tokens[idx]).float()
                feats = torch.nn.functional.normalize(raw, dim=-1).numpy()
                if out.shape[1] == 0:
                    out = np.empty((len(texts), feats.shape[1]), np.float32)
                out[idx.numpy()] = feats
                norms[idx.numpy()] = raw.norm(dim=-1).numpy()
                if on_batch is not None:
                    on_batch(len(idx))
        return out, norms

    def _encode_tokens(self, tokens: Any) -> Any:
        """open_clip's encode_text, run only over the positions up to the batch's longest sequence.

        With a causal mask, a position never attends to later ones, so the EOT token's
        output is the same whether the padding after it is computed or not; CLIP pads
        every caption to 77 tokens, and captions are mostly under 20.
        """
        import torch
        from open_clip.transformer import text_global_pool

        m = self.model
        if not self._truncatable:
            return m.encode_text(tokens)
        n = int((tokens != 0).sum(1).max())
        tokens = tokens[:, :n]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = text_global_pool(m.ln_final(x), tokens, m.text_pool_type)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x


def _has_causal_eot_text(model: Any) -> bool:
    """open_clip's CLIP text tower: causal mask, pooled at the EOT token (padding id 0)."""
    import torch

    mask = getattr(model, "attn_mask", None)
    if mask is None or not hasattr(model, "positional_embedding") or getattr(model, "text_pool_type", "") != "argmax":
        return False
    upper = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    return bool(torch.isinf(mask[upper]).all() and not torch.isinf(mask[~upper]).any())


def _seed_for(spec: EncoderSpec) -> int:
    return int.from_bytes(hashlib.sha256(spec.arch.encode()).digest()[:4], "little")


def load_encoder(spec: EncoderSpec | str, cache_dir: str | None = None, quiet: bool = False) -> Encoder:
    """Load (once per process) the CLIP model named by `spec`.

    `random` weights are seeded by the architecture name, so the same spec gives the
    same model in every process: an index built with `ViT-B-32:random` is searched
    with exactly the encoder that built it.
    """
    if isinstance(spec, str):
        spec = EncoderSpec.parse(spec)
    key = f"{spec}|{cache_dir}"
    with _cache_lock:
        if key in _loaded:
            return _loaded[key]
        _register_configs()
        _check_available(spec, cache_dir)
        import open_clip
        import torch

        if spec.is_random:
            if not quiet:
                print(f"WARNING: {spec.arch} uses RANDOM weights (spec {spec}); for tests and benchmarks only", file=sys.stderr)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_for(spec))
                logging.disable(logging.WARNING)  # open_clip's own "initialized randomly" line: ours is above
                try:
                    model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=None)
                finally:
                    logging.disable(logging.NOTSET)
        else:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.arch, pretrained=spec.pretrained, cache_dir=cache_dir
                )
            except Exception as exc:  # torch.load and state-dict loading raise many types for a bad file
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise XMError(f"encoder {spec}: could not load weights from {spec.pretrained} ({type(exc).__name__}: {first})") from exc
        encoder = Encoder(spec, model, preprocess, open_clip.get_tokenizer(spec.arch))
        _loaded[key] = encoder
        return encoder
