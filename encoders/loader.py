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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders.device import CPU, Device, announce, out_of_memory
from xm.encoders.precision import DEFAULT_PRECISION, Precision
from xm.errors import XMError

RANDOM = "random"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_configs_registered = False
_cache_lock = threading.Lock()
_loaded: dict[str, Encoder] = {}
# The stated agreement with fp32 eager: every embedding's cosine to its fp32 embedding is at
# least this, asserted on a fixed set in tests/test_precision.py (tiny encoders) and checked
# per real-size encoder by bench/bench_precision.py.
MIN_COSINE = {"bf16": 0.999, "fp16": 0.999, "int8": 0.995}
# The probe text's embedding identifies the weights: an index built with other
# weights under the same name is caught at load time, cheaply.
PROBE_TEXT = "a photo of a dog."


@dataclass(frozen=True)
class EncoderSpec:
    arch: str
    pretrained: str

    @classmethod
    def parse(cls, text: str) -> EncoderSpec:
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
        raise WeightsNotHere(f"encoder {spec}: weights are not in the local cache and the hub is unreachable; "
                             + _weights_advice(spec.arch))


class WeightsNotHere(XMError):
    """An encoder's weights are neither cached nor downloadable here (`availability_problems`
    names every such encoder in one problem, with the advice once)."""


def _weights_advice(arch: str) -> str:
    hub = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return f"pass {arch}:/path/to/checkpoint.pt, or copy a Hugging Face cache into {hub}/hub"


def availability_problems(specs: Iterable[EncoderSpec | str], cache_dir: str | None = None) -> list[str]:
    """Why each of `specs` cannot be loaded here, one line each; loads nothing. Encoders whose
    weights are missing make one problem naming them all, the advice said once."""
    problems: list[str] = []
    missing: list[tuple[EncoderSpec, str]] = []
    _register_configs()
    for spec in specs:
        parsed = EncoderSpec.parse(spec) if isinstance(spec, str) else spec
        try:
            _check_available(parsed, cache_dir)
        except WeightsNotHere as exc:
            missing.append((parsed, str(exc)))
        except XMError as exc:
            problems.append(str(exc))
    if len(missing) == 1:
        problems.append(missing[0][1])
    elif missing:
        problems.append(f"encoders {', '.join(str(s) for s, _ in missing)}: weights not cached, hub unreachable; "
                        + _weights_advice("ARCH"))
    return problems


class Encoder:
    """A loaded CLIP model: normalised image and text embeddings as float32 numpy arrays.

    `precision` is how the forward passes run (see `Precision`); the weights fingerprint
    (`probe`) is always computed in fp32 before any conversion, so an index built at one
    precision accepts the same weights at another.
    """

    def __init__(self, spec: EncoderSpec, model: Any, preprocess: Callable, tokenizer: Callable,
                 precision: Precision = DEFAULT_PRECISION) -> None:
        import torch

        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.precision = Precision.fp32
        self.logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        self._truncatable = _has_causal_eot_text(model)
        with torch.inference_mode():
            probe = self.encode_texts([PROBE_TEXT])
        self.dim = int(probe.shape[1])
        self._probe = [round(float(v), 5) for v in probe[0, :8]]
        self.image_size = getattr(getattr(model, "visual", None), "image_size", None)
        self.precision = precision
        if self.precision != Precision.fp32:
            self.model = _convert(self.model, self.precision)

    def __repr__(self) -> str:
        return f"Encoder({self.spec}, dim={self.dim}, {self.precision})"

    device = "cpu"

    def to(self, device: str | Device) -> Encoder:
        """Run the forward passes on `device` (a `Device`, or a torch device string such as
        `cuda:0`, the GPU a Spark task was given); inputs go there and embeddings come back as
        CPU numpy arrays either way."""
        if isinstance(device, Device):
            device = device.torch
        if device != self.device:
            if self.precision == "int8" and device != "cpu":
                raise XMError(f"encoder {self.spec}: --precision int8 (torch dynamic quantization) runs on the CPU only, not {device}")
            if device.startswith("cuda") and self.precision == "fp32":
                import torch

                # fp32 means fp32: cuDNN's default TF32 convolutions (ViT's patch embedding, ResNets)
                # would round to 10-bit mantissas; matmuls already default to full fp32
                torch.backends.cudnn.allow_tf32 = False
            self.model = self.model.to(device)
            self.device = device
        return self

    def probe(self) -> list[float]:
        """The first 8 dims of the probe text's embedding (fp32, whatever the precision): a cheap weights fingerprint."""
        return list(self._probe)

    def _running(self) -> Any:
        """The context every forward pass runs in: inference mode, plus autocast for bf16 and fp16,
        and a device running out of memory turned into one line naming --batch-size."""
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(out_of_memory(self.device))
        stack.enter_context(torch.inference_mode())
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            stack.enter_context(torch.autocast(self.device.split(":")[0], dtype=dtype))
        return stack

    def fingerprint_matches(self, probe: Sequence[float] | None, tol: float = 2e-3) -> bool:
        """Whether `probe` is these weights' fingerprint; None (an index whose embeddings came
        precomputed, the encoder never loaded) is not verifiable and is not held against it."""
        if probe is None:
            return True
        return bool(np.allclose(self.probe(), np.asarray(probe, dtype=np.float64), atol=tol))

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """Image embeddings of an already preprocessed batch (N,3,H,W tensor)."""
        import torch

        with self._running():
            # non-blocking from pinned memory (the build's loader pins on CUDA); .cpu() below waits for it
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        with torch.inference_mode():
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

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
                                on_batch: Callable[[int], None] | None = None,
                                tokens: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(normalised text embeddings, their norms before normalisation): the norms are what
        X-MoRe's raw-dot re-ranking needs, stored at build time so nothing is re-encoded.
        `tokens`: `texts` already tokenised with `self.tokenizer` (the build's input pipeline)."""
        import torch

        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32), np.zeros(0, np.float32)
        if tokens is None:
            tokens = self.tokenizer(list(texts))
        order = torch.argsort((tokens != 0).sum(1), stable=True) if self._truncatable else torch.arange(len(texts))
        out = np.empty((len(texts), 0), np.float32)
        norms = np.empty(len(texts), np.float32)
        with self._running():
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                raw = self._encode_tokens(tokens[idx].to(self.device)).float().cpu()
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


def _convert(model: Any, precision: Precision) -> Any:
    """The model converted for `precision` (in place where torch allows). fp16 keeps fp32
    weights and runs under fp16 autocast (on the CPU too, where torch >= 2.4 supports it):
    autocast keeps the layer norms and softmax in fp32, which a plain fp16 cast of the
    weights would not on the CPU."""
    import torch

    if precision == "bf16":
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(model, dtype=torch.bfloat16)
        return model
    if precision == "int8":
        import warnings

        from open_clip.modified_resnet import AttentionPool2d

        # RN50's attention pool reads its projections' `.weight` directly: those stay fp32
        pooled = {f"{name}.{child}" if name else child for name, mod in model.named_modules()
                  if isinstance(mod, AttentionPool2d) for child, _ in mod.named_children()}
        linears = {name for name, mod in model.named_modules() if type(mod) is torch.nn.Linear and name not in pooled}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, linears, dtype=torch.qint8)
        for mod in model.modules():  # open_clip's get_cast_dtype reads this off a quantized c_fc
            if type(mod).__name__ == "Linear" and type(mod).__module__.startswith("torch.ao.nn.quantized"):
                mod.int8_original_dtype = torch.float32
        return model.eval()
    return model


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


def load_encoder(spec: EncoderSpec | str, cache_dir: str | None = None, quiet: bool = False,
                 precision: Precision | str | None = DEFAULT_PRECISION, device: Device = CPU) -> Encoder:
    """Load (once per process, precision and device) the CLIP model named by `spec`, placed on
    `device` (already parsed at the caller's edge; its first GPU for a list).

    `random` weights are seeded by the architecture name, so the same spec gives the
    same model in every process: an index built with `ViT-B-32:random` is searched
    with exactly the encoder that built it. `precision` is how its
    forward passes run (fp32 | bf16 | fp16 | int8); the weights and their fingerprint (computed on the CPU in fp32, before
    the model moves) are the same at every precision and on every device.
    """
    # every encoder is loaded here: a plain string given by a caller is coerced by the one parser
    precision = Precision.parse(precision)
    if isinstance(spec, str):
        spec = EncoderSpec.parse(spec)
    where = device.torch
    announce()  # the command's device line, now that its options are all validated
    key = f"{spec}|{cache_dir}|{precision}" + ("" if where == "cpu" else f"|{where}")
    with _cache_lock:
        if key in _loaded:
            return _loaded[key]
        base = _loaded.get(f"{spec}|{cache_dir}|fp32")
        if base is not None:  # the fp32 model is loaded already: convert a copy of it
            import copy

            # built on the CPU (its probe runs there), then placed on the device asked for
            encoder = Encoder(spec, copy.deepcopy(base.model).to("cpu"), base.preprocess, base.tokenizer, precision)
            encoder.to(where)
            _loaded[key] = encoder
            return encoder
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
        # built on the CPU (the fp32 probe runs there), then moved
        encoder = Encoder(spec, model, preprocess, open_clip.get_tokenizer(spec.arch), precision).to(where)
        _loaded[key] = encoder
        return encoder
