"""What one `xm build-index` run is asked to do."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xm.encoders.device import Device
from xm.encoders.precision import Precision
from xm.errors import XMError
from xm.pipeline import compress
from xm.pipeline.memory_sizes import parse_size
from xm.pipeline.runners import registry as runners
from xm.pipeline.runners.base import Runner
from xm.pipeline.sources import registry as sources
from xm.pipeline.sources.base import Source

STAGES = ("select", "download", "embed", "index", "compress", "store", "manifest")
# what one encoder can contribute to an index: embeddings of a modality, a kNN index over them
ENCODER_PARTS = ("image", "text", "index-image", "index-text")


def parse_encoder_flag(text: str, flag: str = "--encoder") -> tuple[str, tuple[str, ...]]:
    """`ARCH:PRETRAINED=image,text,index-image,index-text` -> (spec, parts); an index implies its embeddings."""
    spec, sep, rest = text.partition("=")
    spec = spec.strip()
    if not sep or not spec:
        raise XMError(f"{flag} {text!r}: expected ARCH:PRETRAINED={','.join(ENCODER_PARTS)} (any of them)")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    bad = [p for p in parts if p not in ENCODER_PARTS]
    if bad or not parts:
        raise XMError(f"{flag} {text!r}: unknown part(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ENCODER_PARTS)}")
    wanted = set(parts) | {p.removeprefix("index-") for p in parts if p.startswith("index-")}
    return spec, tuple(p for p in ENCODER_PARTS if p in wanted)


@dataclass
class BuildConfig:
    source: str  # the --source value
    out: Path
    coarse: str = "ViT-B-32:openai"
    fine: str = "ViT-L-14:openai"
    inference: list[str] = field(default_factory=lambda: ["RN50:openai"])
    # the kind of source (`Source.name`), resolved from `source` once by `validate` (`kind`)
    source_kind: str | None = None
    # source selection
    limit: int | None = None
    parts: list[int] | None = None
    url_col: str = "url"
    caption_col: str = "caption"
    metadata_root: str | None = None  # LAION metadata parquet folder or base URL
    embeddings_root: str | None = None  # LAION precomputed embeddings folder or base URL
    nsfw_filter: bool = True
    allow_file_urls: bool = False  # file:// URLs in a table read the local disk: off unless asked
    # download (img2dataset)
    image_size: int = 256
    processes: int = 2
    threads: int = 16
    # rows per download shard and part; None: parts sized for the memory (pipeline/part_size.py)
    shard_size: int | None = None
    timeout: int = 10
    distributor: str = "multiprocessing"  # which runner (`runner_kind`): pipeline/runners/
    # Spark (--distributor pyspark): master URL (local[N], local[N,F], spark://, yarn, k8s://) and
    # key=value settings; none under spark-submit, whose session is used as it is
    spark_master: str | None = None
    spark_conf: list[str] = field(default_factory=list)
    # open Spark's web UI to the network (a cluster master); without it: loopback only (local), or off
    spark_ui: bool = False
    # embed
    batch_size: int = 64
    precision: str = "fp32"  # how the encoders run while embedding (xm.encoders.PRECISIONS); in the manifest
    # where the encoders run (`Device`, parsed by `validate`; "auto" until then): never in the manifest,
    # whose artefacts are the same whichever device made them; several GPUs share the parts out
    device: Device | str = "auto"
    # processes decoding and preprocessing images for the embed stage (pipeline/loader.py); None: from the cores
    num_workers: int | None = None
    # index (autofaiss)
    shards: int = 1
    k: int = 128
    max_index_memory: str = "4G"
    current_memory: str = "16G"
    max_query_time_ms: float = 10.0
    # the refine step (bench/bench_knn.py): a query of k re-scores the top k*F candidates of a
    # compressed (IVF-PQ, HNSW-PQ) index exactly against the float16 embeddings on disk; 0 or 1: off
    refine_k_factor: int = 4
    index_text: bool = True
    stages: tuple[str, ...] = STAGES
    cache_dir: str | None = None
    # where an --out or an input on object storage (s3://, gs://, hdfs://) is mirrored
    # (pipeline/staging.py); default $XM_HOME/cache; on a cluster, a folder every executor sees
    stage_dir: str | None = None
    # set by staging, never by a user: --out's URL when the Spark tasks write their parts there
    # themselves (pipeline/task_mirror.py; cfg.out is then the driver's own staging folder)
    bucket: str | None = None
    # set by staging, never by a user: the --source as given (an s3:// URL, say) when `source` now
    # names its local copy; the manifest records this one, so it stays true on another machine
    source_given: str | None = None
    # the general form: ARCH:PRETRAINED=image,text,index-image,index-text (repeatable), on top of the roles
    encoders: list[str] = field(default_factory=list)
    # compressed caption embeddings (pipeline/compress.py): SPEC=CODEC, a FAISS codec string (SQ8, PQ64, ...)
    text_codecs: list[str] = field(default_factory=list)
    image_codecs: list[str] = field(default_factory=list)  # the same for image embeddings (the refine step's)

    def validate(self) -> BuildConfig:
        """Every option checked here, once; one line naming the option."""
        positive = {"--limit": self.limit, "--shards": self.shards, "--k": self.k, "--batch-size": self.batch_size,
                    "--image-size": self.image_size, "--processes": self.processes, "--threads": self.threads,
                    "--shard-size": self.shard_size, "--timeout": self.timeout}
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise XMError(f"{flag} {value}: must be at least 1")
        refine: object = self.refine_k_factor  # the API may pass any value
        if not isinstance(refine, int) or not 0 <= refine <= 64:
            raise XMError(f"--refine-k-factor {self.refine_k_factor}: must be an integer from 0 (off) to 64")
        self.precision = Precision.parse(self.precision)
        workers: object = self.num_workers  # the API may pass any value
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise XMError(f"--num-workers {self.num_workers}: must be 0 (decode in this process) or more")
        runner = self.runner_kind
        # a Spark driver often has no GPU: its tasks use the GPU Spark gives each (`embed_task`)
        self.device = Device.parse(self.device, "--device", check=runner.in_process)
        if not runner.in_process:
            self.device.single(f"--distributor {self.distributor} (each task uses the GPU Spark gives it)")
        runner.check_options(self)
        if runner.absolute_paths:
            self._absolute_paths()
        budget, available = parse_size("--max-index-memory", self.max_index_memory), parse_size("--current-memory", self.current_memory)
        if budget >= available:
            raise XMError(f"--current-memory {self.current_memory}: must exceed --max-index-memory {self.max_index_memory} "
                          "(autofaiss needs room beyond the index to build it)")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise XMError(f"--out {out}: is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not ((out / "_work").is_dir() or (out / "manifest.json").is_file()):
            raise XMError(f"--out {out}: a non-empty folder that is not an xm index; choose a new or empty folder")
        self.plan()  # --encoder flags parse
        self.codecs()  # --text-codec/--image-codec flags parse, name an encoder with that modality and a FAISS codec
        self.source_kind = self.kind.name  # resolved once, the flags checked first; one line if it names no source
        return self

    @property
    def kind(self) -> Source:
        """The build's source, as `validate` resolved it (a Spark task's config carries its name)."""
        return sources.get(self.source_kind) if self.source_kind is not None else sources.lookup(self.source)

    @property
    def runner_kind(self) -> type[Runner]:
        """Where the build's work runs (`--distributor`), asked for everything that differs."""
        return runners.get(self.distributor)

    def plan(self) -> dict[str, tuple[str, ...]]:
        """What each encoder contributes, coarse first. X-MoRe's roles are named defaults:
        coarse = image + text embedded and indexed (text index unless --no-text-index),
        fine and inference = caption embeddings; `--encoder` adds to that. A source's
        precomputed arrays of a planned encoder are stored too (a copy: DataComp's l14_img
        gives the fine encoder image embeddings, RECO's memory)."""
        wanted: dict[str, set[str]] = {self.coarse: {"image", "text", "index-image"} | ({"index-text"} if self.index_text else set())}
        for spec in [self.fine, *self.inference]:
            wanted.setdefault(spec, set()).add("text")
        for flag in self.encoders:
            spec, parts = parse_encoder_flag(flag)
            wanted.setdefault(spec, set()).update(parts)
        # before `validate` resolves the source, a value that names none has no arrays (validate says why)
        source = self.kind if self.source_kind is not None else sources.find(self.source)
        for spec, modality in source.provided(self) if source is not None else {}:
            if spec in wanted:
                wanted[spec].add(modality)
        return {spec: tuple(p for p in ENCODER_PARTS if p in parts) for spec, parts in wanted.items()}

    def _absolute_paths(self) -> None:
        """Executors run in other working directories: every local path a task reads is made
        absolute here, on the driver (URLs and source names stay as they are)."""
        self.out = Path(self.out).resolve()
        if Path(self.source).exists():
            self.source = str(Path(self.source).resolve())
        for name in ("metadata_root", "embeddings_root", "cache_dir", "stage_dir"):
            value = getattr(self, name)
            if value and "://" not in value:
                setattr(self, name, str(Path(value).resolve()))

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for a Spark task (the unit of work carries no closures)."""
        return {**dataclasses.asdict(self), "out": str(self.out), "device": str(self.device)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        # the device as the driver resolved it; a task checks what it was given (`embed_task`)
        return cls(**{**data, "out": Path(data["out"]), "stages": tuple(data["stages"]),
                      "device": Device.parse(data.get("device", "cpu"), check=False)})

    def workers(self) -> int:
        """Decoding processes of the embed stage: --num-workers, else `loader.default_workers` (on an
        accelerator the cores beyond the one that drives it; 0 on the CPU); a Spark task decodes in
        its own process (the executor's cores are Spark's to share out) unless --num-workers says otherwise."""
        if self.num_workers is not None:
            return self.num_workers
        from xm.pipeline.loader import default_workers

        return default_workers(self.target.is_accelerator) if self.runner_kind.in_process else 0

    @property
    def target(self) -> Device:
        """The device `validate` parsed (the driver's; a Spark task's is the GPU it was given)."""
        return Device.parse(self.device, check=False)

    def codecs(self) -> dict[str, dict[str, str]]:
        """{spec: {modality: codec}} from --text-codec and --image-codec (pipeline/compress.py)."""
        plan = self.plan()
        return compress.parse_codecs(list(self.image_codecs), plan, "image", compress.parse_codecs(list(self.text_codecs), plan))

    def encoder_specs(self) -> list[str]:
        """Every distinct encoder of the index, coarse first."""
        return list(self.plan())
