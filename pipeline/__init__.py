"""The offline stages that turn a source of image-text pairs into an xm index."""

from xm.pipeline.build import BuildSummary, build_index
from xm.pipeline.config import STAGES, BuildConfig
from xm.pipeline.sources.base import Part, Sample, Source
from xm.pipeline.sources.registry import register as register_source

__all__ = ["BuildConfig", "BuildSummary", "Part", "STAGES", "Sample", "Source", "build_index", "register_source"]
