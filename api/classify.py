"""`xm classify` as a Python API: files in, one result dict per image out.

    from xm.classify import Classifier
    clf = Classifier("indexes/mine", "classes.txt", model="RN50:openai")
    for result in clf.run(["a.jpg", "b.jpg"]):
        print(result["top5"][0])
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from xm.encoders import load_image
from xm.errors import XMError
from xm.indexes import open_index
from xm.indexes.layout import write_json
from xm.methods.ensemble import MODES, StreamState
from xm.methods.retrieval import Timings
from xm.methods.xmore import XMoRe
from xm.methods.zeroshot import DEFAULT_TEMPLATE, read_labels


class Classifier:
    def __init__(self, index: str | Path, labels: str | Path | Sequence[str], model: str = "RN50:openai",
                 templates: Sequence[str] = (DEFAULT_TEMPLATE,), k_coarse: int = 128, k_fine: int = 16,
                 ensemble: str = "modal", retrieval: str = "direct", state_file: str | Path | None = None) -> None:
        if ensemble not in MODES:
            raise XMError(f"--ensemble {ensemble!r}: choose from {', '.join(MODES)}")
        if retrieval not in ("direct", "indirect"):
            raise XMError(f"--retrieval {retrieval!r}: choose direct or indirect")
        if k_fine < 1 or k_coarse < k_fine:
            raise XMError(f"--k-coarse {k_coarse} / --k-fine {k_fine}: need 1 <= k-fine <= k-coarse")
        self.classnames = read_labels(labels) if isinstance(labels, (str, Path)) else list(labels)
        self.memory = open_index(index)
        self.method = XMoRe(self.memory, model, self.classnames, templates, k_coarse, k_fine, retrieval)
        self.ensemble = ensemble
        self.state_file = Path(state_file) if state_file else None
        # a stream continues only with the same index, labels, model and ensemble
        self.stream_key = hashlib.sha256(json.dumps(
            [self.memory.id, self.classnames, list(templates), model, ensemble, retrieval, k_coarse, k_fine]
        ).encode()).hexdigest()[:16]
        self.state = self._load_state()

    def _load_state(self) -> StreamState:
        if self.state_file is None or not self.state_file.exists():
            return StreamState()
        try:
            data = json.loads(self.state_file.read_text())
            state = StreamState.from_dict(data["state"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise XMError(f"{self.state_file}: unreadable stream state ({exc})") from exc
        if data.get("stream_key") != self.stream_key:
            raise XMError(f"{self.state_file}: belongs to a stream with another index, label set, model or ensemble")
        return state

    def save_state(self) -> None:
        if self.state_file is not None:
            write_json(self.state_file, {"stream_key": self.stream_key, "state": self.state.to_dict()})

    def run(self, images: Sequence[str | Path], batch_size: int = 16, explain: bool = False) -> Iterator[dict[str, Any]]:
        """Classify images as one stream, in order; yields one dict per image.

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
            preds = self.method.classify([im for _, im in loaded], self.state, self.ensemble, timings) if loaded else []
            n = max(1, len(loaded))
            per_image = {"image load": load_s / n, **{k: v / n for k, v in timings.seconds.items()}}
            first = self.state.count - len(preds) + 1
            by_slot = {j: (first + r, pred) for r, ((j, _), pred) in enumerate(zip(loaded, preds))}
            for j, p in enumerate(batch):
                if j in errors:
                    yield {"image": str(p), "error": str(errors[j])}
                    continue
                position, pred = by_slot[j]
                result = {
                    "image": str(p),
                    "stream_position": position,
                    "prediction": pred.top(self.classnames, 1)[0]["class"],
                    "top5": pred.top(self.classnames, 5),
                    "weights": {"img": pred.weights.img, "txt": pred.weights.txt},
                    "confidence": {"img": pred.evidence.c_img, "txt": pred.evidence.c_txt},
                    "timings": per_image,
                }
                if explain:
                    result["captions"] = self.method.explain(pred.evidence)
                yield result
