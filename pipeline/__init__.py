"""The offline stages that turn a source of image-text pairs into an xm index."""

from xm.pipeline.build import BuildSummary, build_index
from xm.pipeline.config import STAGES, BuildConfig

__all__ = ["BuildConfig", "BuildSummary", "STAGES", "build_index"]
