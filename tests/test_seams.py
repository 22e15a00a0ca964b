"""The plug-in seams from the outside: a toy source, a toy memory and a toy method, all
registered from this file with no change to xm's files, build an index and classify through
it; and the layering between xm's folders holds (checked on the import statements).

The toy memory is a labelled nearest-neighbour setting over generated images captioned with
their class names: a mechanics check of the seams, not zero-shot classification."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import TINY_ROLES, jpeg_bytes, make_image, near_duplicate
from xm.classify import Classifier
from xm.memories import Memory, open_memory, register_memory
from xm.memories.registry import unregister_memory
from xm.methods import registry as methods
from xm.methods.base import Decision, ExplanationSection, Method, Need, Option, Queries
from xm.pipeline import BuildConfig, Part, Sample, Source, build_index, register_source
from xm.pipeline.sources import registry as sources

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["heron", "tram", "fern", "kiln"]
PER_CLASS = 3  # memory items per class: near-duplicates of the class's exemplar image


def exemplar(c: int) -> Any:
    return make_image(500 + c)


class ShelfSource(Source):
    """`--source shelf:`: per class, near-duplicates of one exemplar image, captioned with the
    class name; one part per class."""

    name = "shelf"

    def recognises(self, value: str) -> bool:
        return value.startswith("shelf:")

    def parts(self, cfg: Any, layout: Any) -> list[Part]:
        def samples(c: int) -> Iterator[Sample]:
            for j in range(PER_CLASS):
                yield Sample(key=f"shelf-{c}-{j}", caption=f"an old photo of a {CLASSES[c]} on a shelf",
                             image=jpeg_bytes(near_duplicate(exemplar(c), 31 * c + j)), extra={"shelf": c})

        return [Part(name=f"{c:05d}", samples=lambda c=c: samples(c), size=PER_CLASS) for c in range(len(CLASSES))]


class HidingMemory(Memory):
    """`hide+PATH?ids=1,2`: a local index with some items hidden from every search (what a
    per-run decontamination filter does). Everything else is the inner memory's."""

    kind = "hide"

    def __init__(self, location: str | Path) -> None:
        path, _, query = str(location).removeprefix("hide+").partition("?ids=")
        self.inner = open_memory(path)
        self.hidden = np.array([int(i) for i in query.split(",") if i], np.int64)
        self.root = str(location)
        self.count = self.inner.count
        self.searches = 0

    @property
    def id(self) -> str:
        return f"{self.inner.id}-hide-{','.join(map(str, self.hidden))}"

    @property
    def roles(self) -> dict[str, Any]:
        return self.inner.roles

    @property
    def encoders(self) -> list[str]:
        return self.inner.encoders

    def probe(self, spec: str) -> list[float] | None:
        return self.inner.probe(spec)

    def default_model(self) -> str:
        return self.inner.default_model()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "kind": self.kind, "hidden": len(self.hidden)}

    def has_embeddings(self, spec: str, modality: str) -> bool:
        return self.inner.has_embeddings(spec, modality)

    def has_norms(self, spec: str, modality: str) -> bool:
        return self.inner.has_norms(spec, modality)

    def has_index(self, spec: str, modality: str) -> bool:
        return self.inner.has_index(spec, modality)

    def check_encoder(self, encoder: Any, role: str) -> None:
        self.inner.check_encoder(encoder, role)

    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        self.searches += 1
        sims, ids = self.inner.search(modality, queries, k + len(self.hidden), encoder)
        keep = ~np.isin(ids, self.hidden)
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        out_i = np.full((len(ids), k), -1, np.int64)
        for r in range(len(ids)):
            s, i = sims[r][keep[r]][:k], ids[r][keep[r]][:k]
            out_s[r, : len(s)], out_i[r, : len(i)] = s, i
        return out_s, out_i

    def embeddings(self, spec: str, modality: str) -> Any:
        return self.inner.embeddings(spec, modality)

    def norms(self, spec: str, modality: str) -> Any:
        return self.inner.norms(spec, modality)

    @property
    def caption_hashes(self) -> Any:
        return self.inner.caption_hashes

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return self.inner.rows(ids, columns)


class CaptionVote(Method):
    """`caption-vote`: the k nearest memory images vote for the classes their captions name."""

    name = "caption-vote"
    summary = "k nearest memory images vote with the class names in their captions (a test plug-in)"
    options = (Option("k", 3, "neighbours that vote", minimum=1),)
    thread_safe_evidence = True

    def needs(self) -> list[Need]:
        return [Need(self.ctx.memory.roles["coarse"], "image", "index")]

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        coarse = self.ctx.encoder(self.ctx.memory.roles["coarse"])
        _, ids = self.ctx.memory.search("image", queries.features(coarse), self.opts["k"])
        votes = np.zeros((len(ids), len(self.ctx.classnames)), np.float32)
        for r, row in enumerate(ids):
            for caption in self.ctx.memory.captions([int(i) for i in row if i >= 0]):
                for c, name in enumerate(self.ctx.classnames):
                    votes[r, c] += name in caption
        return {"votes": votes, "ids": ids}

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        v = evidence["votes"] + 1e-6
        probs = v / v.sum(1, keepdims=True)
        return Decision(probs=probs, components={"votes": probs}, info=[{} for _ in range(len(v))])

    def explain(self, evidence: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        return {"neighbours": [int(i) for i in evidence["ids"][row]]}

    def explanation_view(self, explanation: dict[str, Any]) -> list[ExplanationSection]:
        ids = explanation["neighbours"]
        return [ExplanationSection("Voters", ("id", "caption"),
                                   tuple(zip(ids, self.ctx.memory.captions(ids), strict=True)))]


@pytest.fixture
def plugins() -> Iterator[None]:
    register_source(ShelfSource)
    register_memory(lambda location: str(location).startswith("hide+"), HidingMemory, name="hide")
    methods.register(CaptionVote)
    yield
    sources.unregister("shelf")
    unregister_memory("hide")
    methods.unregister("caption-vote")


def test_a_toy_source_memory_and_method_build_and_classify(plugins, tmp_path) -> None:
    out = tmp_path / "shelf-index"
    summary = build_index(BuildConfig(source="shelf:", out=out, **TINY_ROLES))
    assert summary.source_kind == "shelf" and summary.count == len(CLASSES) * PER_CLASS
    assert json.loads((out / "manifest.json").read_text())["source"]["kind"] == "shelf"

    # all memory items visible: each exemplar's own near-duplicates vote for its class
    queries = [exemplar(c) for c in range(len(CLASSES))]
    clf = Classifier(f"hide+{out}?ids=", CLASSES, method="caption-vote", options={"k": PER_CLASS})
    assert isinstance(clf.memory, HidingMemory) and clf.memory.describe()["kind"] == "hide"
    rows = clf.classify_images(queries, explain=True)
    assert [r["prediction"] for r in rows] == CLASSES
    assert clf.memory.searches == 1

    # the first class's items hidden: its exemplar can no longer be answered from its own items
    first = [int(i) for i in np.nonzero(np.arange(summary.count) < PER_CLASS)[0]]
    hidden = Classifier(f"hide+{out}?ids={','.join(map(str, first))}", CLASSES, method="caption-vote",
                        options={"k": PER_CLASS})
    rows = hidden.classify_images(queries, explain=True)
    assert all(i not in first for r in rows for i in r["neighbours"])
    assert [r["prediction"] for r in rows[1:]] == CLASSES[1:] and rows[0]["prediction"] != CLASSES[0]


def test_the_cli_reaches_the_plugins_and_renders_their_explanation(plugins, tmp_path) -> None:
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    out = tmp_path / "shelf-index"
    build_index(BuildConfig(source="shelf:", out=out, **TINY_ROLES))
    image = tmp_path / "kiln.png"
    exemplar(3).save(image)
    labels = tmp_path / "classes.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    r = CliRunner().invoke(app, ["classify", str(image), "--labels", str(labels), "--index", f"hide+{out}?ids=",
                                 "--method", "caption-vote", "--explain"])
    assert r.exit_code == 0, r.output
    words = " ".join(r.output.split())  # a narrow terminal wraps long cells
    assert "kiln" in words and "Voters" in words and "an old photo of a kiln on a shelf" in words
    listed = CliRunner().invoke(app, ["methods"])
    assert "caption-vote" in listed.output


# --- layering -----------------------------------------------------------------------------
FOLDERS = {"api", "cli", "encoders", "evaluation", "indexes", "memories", "methods", "pipeline", "server", "texts", "training"}
# folder -> folders it must never import (docs/architecture.md, "Layers")
FORBIDDEN = {
    "api": {"server", "cli"},
    "methods": {"training", "evaluation", "server", "cli", "pipeline"},
    "indexes": {"methods", "encoders", "pipeline", "memories", "server", "cli", "training", "evaluation"},
    "memories": {"server", "cli", "pipeline", "methods", "training", "evaluation"},
    "encoders": {"indexes", "memories", "methods", "pipeline", "server", "cli", "training", "evaluation"},
    "pipeline": {"methods", "server", "cli", "training", "evaluation"},
    "server": {"cli"},
    "training": {"server", "cli", "evaluation"},
    "evaluation": {"server", "cli"},
    "texts": {"server", "cli"},
}


def _package_dirs() -> dict[str, str]:
    """`xm.sub` -> folder, read from pyproject's package-dir (the one place it is written)."""
    import tomllib

    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"])


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)


def _folder_of(module: str, dirs: dict[str, str]) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        folder = dirs.get(".".join(parts[:n]))
        if folder is not None:
            return folder
    return None


def test_the_folders_import_only_what_their_layer_allows() -> None:
    dirs = _package_dirs()
    assert set(dirs.values()) == FOLDERS, "a new folder needs its row in FORBIDDEN and docs/architecture.md"
    # `xm` is api/: `from xm import x` names a lazy attribute of api/__init__ or a subpackage
    broken = []
    for folder, banned in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imports(path):
                target = _folder_of(module, dirs)
                if target in banned:
                    broken.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({folder}/ must not use {target}/)")
    assert not broken, "\n".join(broken)


def test_pipeline_has_no_import_circle() -> None:
    """Imports between pipeline/'s modules form no cycle, counting those inside functions too: a
    function-level import is for a heavy library, never a way round a circle."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT / "pipeline").with_suffix("")
        name = ".".join(("xm.pipeline", *[p for p in rel.parts if p != "__init__"]))
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xm.pipeline"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("xm.pipeline"))
        graph[name] = deps

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done or node not in graph:
            return
        for dep in sorted(graph[node]):
            # a package's __init__ re-exporting its modules is not a circle through the package
            if not node.startswith(dep + "."):
                visit(dep, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)
