"""The one method interface: every command (classify, benchmark, the API, the server)
computes a method only through this.

A method is a class (in the spirit of open_clip's one class per task) that declares

* `name`, `summary`, its `options` (typed, with defaults and help; validated here, once),
* what it `needs` from an index (encoder x modality embeddings, kNN indexes, trained state),
* optionally `fit(support)` (few-shot methods; trained methods train offline with `xm train`),
* `evidence(queries)`: batched per-query arrays that do not depend on stream order
  (cacheable: `evidence_key()` names everything they depend on besides the images),
* `decide(evidence, state)`: the prediction, which may depend on the stream (X-MoRe's
  confidence adjustment does; other methods ignore `state`).

Variants are named option presets of one method (`xmore-minmax` is X-MoRe with
`ensemble=modal`), registered in `methods/registry.py`. Test labels never reach a
method: `fit` sees support labels only, `evidence` and `decide` see images and class names.

What the commands around a method need to know of it, it declares too (so that no
command names a method):

* `thread_safe_evidence`: whether `evidence` may run for several requests at once on one
  instance (the server locks the others),
* `explanation_view(explanation)`: its `explain()` output as titled tables of plain data,
  which `xm classify --explain` prints,
* `diagnostics(decision, labels)`: a benchmark's per-method analysis, called after a
  whole scored stream was decided (the only place test labels meet a method).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from xm.encoders.device import CPU, Device
from xm.encoders.precision import DEFAULT_PRECISION, Precision
from xm.errors import XMError

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class Option:
    """One option of a method: a typed value with a default, choices and help."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    # whether the option changes the method's evidence (and so its cache key), or only its decision
    evidence: bool = True

    @property
    def type(self) -> type:
        return type(self.default) if self.default is not None else str

    def coerce(self, method: str, value: Any) -> Any:
        """The value as this option's type, or one line naming the method, option and problem."""
        flag = f"{method} option {self.name}"
        if value is None:
            return None
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes", "on")
            elif self.type in (int, float, str, bool):
                if self.type is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = self.type(value)
        except (TypeError, ValueError) as exc:
            name = self.type.__name__
            raise XMError(f"{flag}: {value!r} is not {'an' if name[0] in 'aeiou' else 'a'} {name}") from exc
        if self.choices is not None and value not in self.choices:
            raise XMError(f"{flag}: {value!r}; choose from {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise XMError(f"{flag}: {value!r} is below its minimum {self.minimum:g}")
        return value


@dataclass(frozen=True)
class Need:
    """One thing a method needs from an index, and the build flag that adds it."""

    encoder: str  # ARCH:PRETRAINED
    modality: str  # image | text
    kind: str  # "embeddings" | "index" | "norms" | "trained"
    path: str | None = None  # for kind="trained": the file that must exist

    def flag(self) -> str:
        if self.kind == "trained":
            return "xm train"
        add = {"embeddings": self.modality, "index": f"index-{self.modality}", "norms": self.modality}[self.kind]
        return f"xm build-index --out IDX --add-encoder {self.encoder}={add}"

    def describe(self) -> str:
        if self.kind == "trained":
            return f"trained state {self.path}"
        what = {"embeddings": "embeddings", "index": "kNN index", "norms": "embedding norms"}[self.kind]
        return f"{self.encoder} {self.modality} {what}"


class Queries:
    """A batch of decoded query images whose features are computed once per encoder (and
    precision), whichever methods ask for them (a benchmark runs several methods over one
    pass); each image is preprocessed once for all encoders whose preprocessing is equal."""

    def __init__(self, images: Iterable[Any], timings: Any = None, features: dict[str, np.ndarray] | None = None) -> None:
        # a Sequence is kept as it is: a lazy one is decoded only if a method needs pixels
        self.images = images if isinstance(images, Sequence) else list(images)
        self.timings = timings  # a methods.retrieval.Timings, or None: where methods add step times
        self._features: dict[str, np.ndarray] = dict(features or {})  # known already (a benchmark's cache)
        self._pixels: dict[str, Any] = {}

    def computed(self) -> dict[str, np.ndarray]:
        """The features computed (or given) so far, by encoder and precision."""
        return dict(self._features)

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, preprocess: Any) -> Any:
        """The images as one preprocessed (n,3,H,W) batch, made once per distinct preprocessing
        (torchvision transforms print their parameters: equal repr, equal output)."""
        import torch

        key = repr(preprocess)
        if key not in self._pixels:
            t = time.perf_counter()
            self._pixels[key] = torch.stack([preprocess(im) for im in self.images])
            self.add_time("preprocess", time.perf_counter() - t)
        return self._pixels[key]

    @staticmethod
    def feature_key(encoder: Any) -> str:
        """The key features are known under: the encoder and the precision it runs at."""
        return f"{encoder.spec}|{getattr(encoder, 'precision', 'fp32')}"

    def features(self, encoder: Any, batch_size: int = 64) -> np.ndarray:
        """Normalised image embeddings (n x d, float32) under `encoder`."""
        key = self.feature_key(encoder)
        if key not in self._features:
            if not self.images:
                self._features[key] = np.zeros((0, encoder.dim), np.float32)
            else:
                self._features[key] = self._encode(encoder, batch_size)
        return self._features[key]

    def _encode(self, encoder: Any, batch_size: int) -> np.ndarray:
        """The forward passes (a server overrides this to batch across requests)."""
        pixels = self.pixels(encoder.preprocess)
        t = time.perf_counter()
        out = np.concatenate([encoder.encode_pixels(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
        self.add_time(f"encode {encoder.spec}", time.perf_counter() - t)
        return out

    def add_time(self, step: str, seconds: float) -> None:
        if self.timings is not None:
            self.timings.add(step, seconds)


@dataclass
class Example:
    """A labelled image of a support or validation set (few-shot methods)."""

    load: Callable[[], Any]  # -> PIL image, RGB
    label: int
    key: str


@dataclass
class Support:
    """What `fit` sees: labelled support images (the dataset's train split) and a
    validation set to choose hyper-parameters on. Never the test split."""

    train: list[Example]
    val: list[Example]
    shots: int
    seed: int


@dataclass(frozen=True)
class ExplanationSection:
    """One titled table of a method's explanation, as plain data. A front end renders it;
    every title, column and cell is data (captions, class names) and is escaped there."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass
class Decision:
    """A method's answer for n queries, in the order they were decided."""

    probs: np.ndarray  # n x C, rows sum to 1 (what is shown and scored)
    components: dict[str, np.ndarray] = field(default_factory=dict)  # n x C each, e.g. p_img, p_txt
    info: list[dict[str, Any]] = field(default_factory=list)  # per query, JSON-ready (weights, ...)
    skipped: np.ndarray | None = None  # n bool: not scored (e.g. too few neighbours); reason in info


class Context:
    """What every method is built with: the memory (may be None for methods that need
    none), the inference encoder, the class names and the prompt templates."""

    def __init__(self, memory: Any, model: str, classnames: Sequence[str], templates: Sequence[str],
                 dataset: str | None = None, cache_dir: str | None = None,
                 precision: Precision = DEFAULT_PRECISION, device: Device = CPU) -> None:
        self.precision = precision  # how every encoder of the methods runs (parsed by the caller)
        self.device = device  # where every encoder and method tensor of the methods runs (parsed by the caller)
        self.memory = memory
        self.model = str(model)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.dataset = dataset  # the benchmark's dataset name (per-dataset defaults); None in classify
        self.cache_dir = cache_dir

    def encoder(self, spec: str) -> Any:
        from xm.encoders import load_encoder

        return load_encoder(spec, cache_dir=self.cache_dir, precision=self.precision, device=self.device)

    def key(self) -> dict[str, Any]:
        key = {"index": getattr(self.memory, "id", None), "model": self.model, "classnames": self.classnames,
               "templates": self.templates, "dataset": self.dataset}
        if self.precision != "fp32":  # fp32 keys stay those of the evidence cached before precisions existed
            key["precision"] = self.precision
        if self.device.is_accelerator:  # another device's kernels round differently: its own evidence
            key["device"] = self.device.kind
        return key


class Method:
    """Base class of every method. Subclasses set the class attributes and implement
    `evidence` and `decide`; see the module docstring."""

    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    trains: ClassVar[bool] = False  # needs `xm train <name>` before use
    few_shot: ClassVar[bool] = False  # `fit(support)` takes labelled support images
    stream: ClassVar[bool] = False  # `decide` depends on the order of the stream
    needs_memory: ClassVar[bool] = True
    # `evidence` only reads state fixed at construction, so concurrent calls on one instance
    # are safe (the server runs them unlocked); False: callers serialise them
    thread_safe_evidence: ClassVar[bool] = False

    def __init__(self, ctx: Context, **options: Any) -> None:
        self.ctx = ctx
        self.opts = self.resolve_options(options)

    @classmethod
    def trains_for(cls, options: dict[str, Any]) -> bool:
        """Whether this method, with these options, needs `xm train` first (RECO's mean fusion does not)."""
        return cls.trains

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in cls.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise XMError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(known) or 'none'}")
        return {name: o.coerce(cls.name, given.get(name, o.default)) for name, o in known.items()}

    # --- what the method needs -------------------------------------------------------
    def needs(self) -> list[Need]:
        return []

    def check(self) -> None:
        """Fail at once, in one line, when the index cannot serve this method."""
        memory = self.ctx.memory
        if memory is None:
            if self.needs_memory:
                raise XMError(f"method {self.name}: needs an index (--index)")
            return
        for need in self.needs():
            if not memory.provides(need):
                raise XMError(f"{memory.root}: method {self.name} needs {need.describe()}, which this index lacks; "
                              f"add it with `{need.flag()}`")

    # --- the three steps -------------------------------------------------------------
    def fit(self, support: Support) -> dict[str, Any]:
        """Few-shot methods learn from `support`; returns what was chosen (recorded in results)."""
        return {}

    def wants_validation(self) -> bool:
        """Whether this method, with its options, chooses something on labelled validation
        images before it decides although it is not few-shot (RECO's `mode=auto`, the
        paper's Table 4 choice); `xm benchmark` then calls `fit` with no support images and
        the validation split."""
        return False

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        raise NotImplementedError

    def new_state(self) -> Any:
        """The stream state `decide` continues (None for methods that ignore the stream)."""
        return None

    def explain(self, evidence: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        """What a person needs to check one prediction (captions used, texts, ...)."""
        return {}

    # --- hooks for the commands around the method ----------------------------------------
    def explanation_view(self, explanation: dict[str, Any]) -> list[ExplanationSection]:
        """`explain()`'s output as titled tables for a reader (`xm classify --explain`).
        `explanation` may hold other keys besides (a result row holds the explanation merged in):
        read only the keys `explain` writes. Default: nothing to show."""
        return []

    def diagnostics(self, decision: Decision, labels: np.ndarray) -> dict[str, Any]:
        """A benchmark's analysis of one scored stream (a JSON-ready dict; default none).
        `decision` is in dataset order and complete: the labels arrive after every query was
        decided, so they cannot reach `evidence` or `decide`."""
        return {}

    def decontamination(self) -> dict[str, Any]:
        """Whether state this method was trained or built with beforehand (RECO's checkpoint,
        CODER's text-set file) kept the run's hidden near-duplicates of the test images out
        (`xm benchmark --decontaminate`): a JSON-ready dict the benchmark records with the
        method's result, with `line` (said once) and `warning` (set where it did not, so the
        figure may be optimistic). Default: nothing built beforehand, nothing to say."""
        return {}

    # --- caching -----------------------------------------------------------------------
    def evidence_key(self) -> str:
        """A digest of everything `evidence` depends on besides the query images."""
        evid = {o.name: self.opts[o.name] for o in self.options if o.evidence}
        parts = {"method": type(self).__name__, "options": evid, **self.ctx.key(), **self.extra_key()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def extra_key(self) -> dict[str, Any]:
        """Subclasses add what else their evidence depends on (fitted state, checkpoint digest)."""
        return {}


def stack_evidence(chunks: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch evidence along the query axis."""
    if not chunks:
        return {}
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def take_rows(evidence: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in evidence.items()}
