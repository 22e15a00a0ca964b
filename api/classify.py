"""`xm classify` as a Python API: files in, one result dict per image out, any method.

    from xm.classify import Classifier
    clf = Classifier("indexes/mine", "classes.txt", method="xmore")
    for result in clf.run(["a.jpg", "b.jpg"]):
        print(result["prediction"], result["top5"][0])

Every method is computed through the one interface (`xm.methods.base`); the server and
the CLI call this class, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders import Device, load_image
from xm.errors import XMError
from xm.indexes.layout import write_json
from xm.memories import Memory, open_memory
from xm.methods.base import Context, Decision, Queries
from xm.methods.protocols import DEFAULT_PROTOCOL, protocol
from xm.methods.registry import create, get
from xm.methods.retrieval import Timings
from xm.methods.zeroshot import DEFAULT_TEMPLATE, check_templates, read_labels


def result_rows(method: Any, classnames: Sequence[str], decision: Decision, evidence: dict[str, np.ndarray],
                explain: bool = False) -> list[dict[str, Any]]:
    """One JSON-ready dict per decided query: prediction, top 5 with each component, the method's info."""
    out = []
    for i, probs in enumerate(decision.probs):
        order = np.argsort(-probs, kind="stable")[:5]
        row: dict[str, Any] = {
            "method": getattr(method, "variant", method.name),
            "prediction": classnames[int(order[0])],
            "top5": [{"class": classnames[int(c)], "prob": float(probs[c]),
                      **{name: float(comp[i, c]) for name, comp in decision.components.items()}} for c in order],
            **(decision.info[i] if decision.info else {}),
        }
        if decision.skipped is not None and decision.skipped[i]:
            row["prediction"] = None
        if explain:
            row.update(method.explain(evidence, i))
        out.append(row)
    return out


class Classifier:
    # held around `method.evidence` by whoever shares this classifier between threads (the
    # server sets one when the method's evidence is not thread safe); None: no lock needed
    evidence_lock: threading.Lock | None = None

    def __init__(self, index: str | Path | Memory | None, labels: str | Path | Sequence[str], method: str = "xmore",
                 model: str | None = None, templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                 protocol_name: str = DEFAULT_PROTOCOL, options: dict[str, Any] | None = None,
                 state_file: str | Path | None = None, precision: str | None = None,
                 device: str | Device | None = None) -> None:
        from xm.encoders.precision import Precision

        precision = Precision.parse(precision)  # the API's edge: fp32 | bf16 | fp16 | int8, checked before any work
        self.device = Device.parse(device).single("a Classifier")  # the API's edge: None is auto
        self.classnames = read_labels(labels) if isinstance(labels, (str, Path)) else list(labels)
        variant = get(method)
        if variant.method.few_shot:
            raise XMError(f"method {method}: few-shot (it needs labelled support images); use `xm benchmark --methods {method} --shots N`")
        if index is None and variant.method.needs_memory:
            raise XMError(f"method {method}: needs an index (--index, or a default index: see `xm indexes`)")
        # a folder, or a clip-retrieval-compatible back's URL (the authors' setting): `open_memory` decides
        self.memory = index if isinstance(index, Memory) or index is None else open_memory(index)
        self.model = model or (self.memory.default_model() if self.memory is not None else None)
        if self.model is None:
            raise XMError("--model: required when there is no index to take the inference encoder from")
        templates = check_templates(list(templates))
        self.ctx = Context(self.memory, self.model, self.classnames, templates, precision=precision, device=self.device)
        # the protocol sets retrieval switches; the command's own options win over it
        opts = {**protocol(protocol_name)["method"], **(options or {})}
        explicit = options or {}
        unknown = sorted(set(explicit) - {o.name for o in variant.method.options})
        if unknown:
            raise XMError(f"method {method}: does not take {', '.join(unknown)}; it takes "
                          f"{', '.join(o.name for o in variant.method.options) or 'no options'}")
        self.method = create(method, self.ctx, strict=False, **opts)
        self.state_file = Path(state_file) if state_file else None
        # a stream continues only with the same index, labels, model, method and options
        self.stream_key = hashlib.sha256(json.dumps(
            [getattr(self.memory, "id", None), self.classnames, templates, self.model, method, self.method.opts],
            default=str).encode()).hexdigest()[:16]
        self.state = self._load_state()

    def _load_state(self) -> Any:
        state = self.method.new_state()
        if self.state_file is None or not self.state_file.exists():
            return state
        if state is None:
            return None
        try:
            data = json.loads(self.state_file.read_text())
            loaded = type(state).from_dict(data["state"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise XMError(f"{self.state_file}: unreadable stream state ({exc})") from exc
        if data.get("stream_key") != self.stream_key:
            raise XMError(f"{self.state_file}: belongs to a stream with another index, label set, model, method or options")
        return loaded

    def save_state(self) -> None:
        if self.state_file is not None and self.state is not None:
            write_json(self.state_file, {"stream_key": self.stream_key, "state": self.state.to_dict()})

    def classify_images(self, images: Sequence[Any], explain: bool = False, timings: Timings | None = None) -> list[dict[str, Any]]:
        """Decoded images, as the next queries of this classifier's stream."""
        queries = Queries(images, timings)
        evidence = self.method.evidence(queries)
        t = time.perf_counter()
        decision = self.method.decide(evidence, self.state)
        queries.add_time("decision", time.perf_counter() - t)
        return result_rows(self.method, self.classnames, decision, evidence, explain)

    def run(self, images: Sequence[str | Path], batch_size: int = 16, explain: bool = False) -> Iterator[dict[str, Any]]:
        """Classify image files as one stream, in order; yields one dict per image.

        An unreadable image yields {"image": path, "error": message} and the stream goes on.
        """
        paths = [Path(p) for p in images]
        for lo in range(0, len(paths), batch_size):
            batch = paths[lo : lo + batch_size]
            loaded: list[tuple[int, Any]] = []
            errors: dict[int, XMError] = {}
            t0 = time.perf_counter()
            for j, p in enumerate(batch):
                try:
                    loaded.append((j, load_image(p)))
                except XMError as exc:
                    errors[j] = exc
            load_s = time.perf_counter() - t0
            timings = Timings()
            rows = self.classify_images([im for _, im in loaded], explain, timings) if loaded else []
            n = max(1, len(loaded))
            per_image = {"image load": load_s / n, **{k: v / n for k, v in timings.seconds.items()}}
            by_slot = {j: row for (j, _), row in zip(loaded, rows)}
            for j, p in enumerate(batch):
                if j in errors:
                    yield {"image": str(p), "error": str(errors[j])}
                    continue
                yield {"image": str(p), **by_slot[j], "device": str(self.device), "timings": per_image}
