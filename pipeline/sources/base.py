"""The `Source` interface: where a build's image-text pairs come from, as parts of samples.

A source is recognised from the `--source` value (a name such as `laion400m`, or the shape
of a path), says whether it needs the select and download stages (a URL list for
img2dataset), gives its parts from the build's options alone (a Spark executor re-derives
a part by name), says which (encoder, modality) arrays it provides precomputed and what it
cannot give a plan (one line each, for the build's preflight).

Sources read only the options below (`SourceOptions`); `BuildConfig` has them all. They
never import the build's config, so the config can hold the resolved source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from xm.errors import XMError
from xm.indexes.layout import Layout

# OpenAI CLIP's learned logit scale (clamped at 100): the precomputed arrays xm reads (LAION's,
# DataComp's) are OpenAI CLIP's, so an encoder never loaded records this one
OPENAI_LOGIT_SCALE = 100.0


@dataclass
class Sample:
    key: str
    caption: str
    url: str | None = None
    image: bytes | None = None
    image_path: str | None = None
    extra: dict = field(default_factory=dict)

    def read_image(self) -> bytes:
        if self.image is not None:
            return self.image
        return Path(self.image_path).read_bytes()  # type: ignore[arg-type]


@dataclass(frozen=True)
class ArrayRef:
    """One precomputed array of a part's rows, in a .npy file or under a key of an .npz."""

    path: Path
    key: str | None  # the .npz member; None: `path` is a .npy
    label: str  # what the manifest records as its origin, e.g. "datacomp:b32_img"
    dim: int | None = None  # the width it must have; None: the same as the encoder's other arrays
    rows: int | None = None  # rows it must have (its metadata's); None: the part's sample count
    meta: Path | None = None  # the metadata file it is row-aligned with (named in errors)

    def __str__(self) -> str:
        return f"{self.path}" + (f" [{self.key}]" if self.key else "")


@dataclass
class Part:
    name: str
    samples: Callable[[], Iterator[Sample]]
    # precomputed embeddings the part brings, by (encoder spec, modality); None: none, images to embed
    precomputed: dict[tuple[str, str], ArrayRef] | None = None
    size: int | None = None  # samples in the part, where known without reading it (progress totals)


class SourceOptions(Protocol):
    """The build options a source reads (`BuildConfig` has them all)."""

    source: str  # the --source value
    coarse: str
    limit: int | None
    parts: list[int] | None
    url_col: str
    caption_col: str
    metadata_root: str | None
    embeddings_root: str | None
    nsfw_filter: bool
    allow_file_urls: bool
    shard_size: int | None  # None: parts sized for the memory (pipeline/part_size.py)
    # --out's URL where the Spark tasks write the build there themselves (`Source.task_inputs`):
    # what they wrote (img2dataset's download) is listed and read there; None: --out is here
    bucket: str | None


Plan = dict[str, tuple[str, ...]]  # encoder spec -> what it contributes (BuildConfig.plan)


class Source:
    """One kind of source. Subclasses set `name` and override what differs; a new one is
    registered with `xm.pipeline.sources.registry.register` (or `xm.pipeline.register_source`)."""

    name: ClassVar[str]  # the kind, as the summary and the manifest record it
    # `--source NAME` picks it; False: it is recognised from a path instead (`recognises`)
    by_name: ClassVar[bool] = True
    # its parts come from img2dataset: the select stage writes a URL list (`select`), the download stage fetches it
    needs_download: ClassVar[bool] = False
    # False: its parts are precomputed arrays and metadata, with no images to embed
    has_images: ClassVar[bool] = True
    # said after the build's "N items have an empty caption" warning
    empty_caption_hint: ClassVar[str] = ""

    def recognises(self, value: str) -> bool:
        """Whether `--source value` means this source; may raise XMError for a value that is
        this kind but unusable (one line)."""
        return self.by_name and value == self.name

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        """The source's parts, from the options alone (`--limit` applied)."""
        raise NotImplementedError

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        """One part by name, as `parts` would give it (a Spark task embeds one part)."""
        return next((p for p in self.parts(cfg, layout) if p.name == name), None)

    def task_inputs(self, cfg: SourceOptions, layout: Layout, name: str) -> list[str] | None:
        """What the task of part `name` reads under `--out` (paths relative to it; a trailing "/"
        names a folder), for a task that works in a folder of its own and writes its part to
        object storage itself (`pipeline/task_mirror.py`); None: not known, so the build's tasks
        work in the shared staging folder instead."""
        return None

    def select(self, cfg: SourceOptions, layout: Layout) -> int:
        """Write the URL list img2dataset reads; return its row count (`needs_download` only)."""
        raise XMError(f"--source {cfg.source}: has no URLs to select")

    def provided(self, cfg: SourceOptions) -> dict[tuple[str, str], str]:
        """(encoder spec, modality) -> the source array that provides it (a label for the manifest)."""
        return {}

    def failures(self, cfg: SourceOptions, layout: Layout) -> dict[str, int]:
        """Samples the source lost before the embed stage, by reason (download failures)."""
        return {}

    def problems(self, cfg: SourceOptions, plan: Plan) -> list[str]:
        """What the source cannot give this plan, one line each (the build's preflight, before any work)."""
        if self.has_images:
            return []
        given = self.provided(cfg)
        need = [spec for spec, parts in plan.items() if "image" in parts and (spec, "image") not in given]
        if not need:
            return []
        have = sorted({spec for spec, _ in given})
        return [f"--source {cfg.source}: precomputed embeddings with no images, so image embeddings under "
                f"{', '.join(need)} cannot be made (its arrays are {' and '.join(have)}'s)"]

    def encoders_to_load(self, cfg: SourceOptions, plan: Plan) -> list[str]:
        """The plan's encoders that compute something; one whose every embedding the source
        provides needs no weights and is not loaded."""
        given = self.provided(cfg)
        return [spec for spec, parts in plan.items() if any(m in parts and (spec, m) not in given for m in ("image", "text"))]

    def precomputed(self, cfg: SourceOptions, spec: str, embedded: list[str]) -> dict[str, str]:
        """Which of `spec`'s stored embeddings are the source's arrays: modality -> the array's
        label (the manifest's `precomputed`; empty where the build computed them)."""
        given = self.provided(cfg)
        return {m: given[(spec, m)] for m in embedded if (spec, m) in given}
