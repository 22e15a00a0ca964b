"""The registry of sources: which one a `--source` value means.

    from xm.pipeline.sources.registry import lookup, register
    source = lookup("laion400m")          # a Source; or lookup("pairs.parquet"), lookup("photos/")
    register(MySource)                    # a plug-in: tried before the built-in ones

Sources are tried in order, the first that `recognises` the value wins: registered
plug-ins first (the latest first), then the built-ins below, named ones before the path
shapes, the plain folder last. A new built-in source is one module and one line here.
"""

from __future__ import annotations

from xm.errors import XMError
from xm.pipeline.sources.base import Source
from xm.pipeline.sources.datacomp import DataComp
from xm.pipeline.sources.folder import ImageFolder
from xm.pipeline.sources.img2dataset_output import Img2datasetOutput
from xm.pipeline.sources.laion400m import Laion400m
from xm.pipeline.sources.laion400m_embeddings import LaionEmbeddings
from xm.pipeline.sources.table import UrlTable

_SOURCES: list[Source] = [Laion400m(), LaionEmbeddings(), DataComp(), UrlTable(), Img2datasetOutput(), ImageFolder()]


def register(source: type[Source]) -> type[Source]:
    """Add a source kind (a `Source` subclass with its own `name`), tried before those already
    registered; one of the same name is replaced. Returns the class (usable as a decorator)."""
    if not isinstance(getattr(source, "name", None), str) or not source.name:
        raise XMError(f"{source.__name__}: a source needs a name")
    unregister(source.name)
    _SOURCES.insert(0, source())
    return source


def unregister(name: str) -> None:
    """Remove the source kind `name` (a test's plug-in, when the test ends)."""
    _SOURCES[:] = [s for s in _SOURCES if s.name != name]


def find(value: str) -> Source | None:
    """The source a `--source` value means; None if no source recognises it."""
    return next((source for source in _SOURCES if source.recognises(value)), None)


def lookup(value: str) -> Source:
    """The source a `--source` value means, or one line saying why none does."""
    source = find(value)
    if source is not None:
        return source
    names = ", ".join(s.name for s in _SOURCES if s.by_name)
    raise XMError(f"{value}: no such file or folder, and not one of {names}")


def get(kind: str) -> Source:
    """The source of a kind name (as a manifest or a Spark task's config records it)."""
    for source in _SOURCES:
        if source.name == kind:
            return source
    raise XMError(f"source kind {kind!r}: unknown; known: {', '.join(s.name for s in _SOURCES)}")

