"""Sources of image-text pairs, each turned into parts of samples for the embed stage.

`base.py` is the interface (`Source`, `Part`, `Sample`, `ArrayRef`); one module per kind;
`registry.py` finds the kind a `--source` value names and takes new ones (`register`).

Kinds:
  laion400m              LAION-400M metadata parts -> select -> img2dataset download
  laion400m-embeddings   LAION's precomputed ViT-B/32 embedding parts (no images)
  table                  parquet/csv/tsv/jsonl of URLs and captions -> img2dataset
  images                 a folder of images with same-name .txt captions
  img2dataset            an img2dataset output folder (webdataset tars or files)
  datacomp               DataComp's metadata parquet + npz pairs (`--metadata-root`): OpenAI
                         CLIP ViT-B/32 and ViT-L/14 image and caption embeddings, no images

Precomputed arrays: a part of `laion400m-embeddings` or `datacomp` carries, per (encoder,
modality), a reference to an array of its rows (`ArrayRef`); `Source.provided(cfg)` says
which (encoder, modality) a source provides. The plan embeds every provided array of a
planned encoder (`BuildConfig.plan`), the embed stage copies them instead of computing
(checked: rows, dim, finite, unit norm), and an encoder all of whose embeddings are
provided is never loaded (`Source.encoders_to_load`): its manifest entry records the source
arrays and no weights probe. Images under any other encoder cannot be made (no images).

`--limit` and `--parts`:
  laion400m              --parts picks metadata parts; --limit cuts the selection
  table                  --limit: the first N rows
  images, img2dataset    --limit: the first N samples over the parts in order (the last cut)
  laion400m-embeddings   --parts picks embedding parts; they are taken whole (no --limit)
  datacomp               --parts picks pairs by position in file-name order (0-based);
                         --limit: the first N rows over the chosen pairs (the last pair cut,
                         its arrays with it), pinned for the build folder. A part is one pair,
                         named by its file stem (DataComp's are hex hashes, sorted = id order).
"""

from __future__ import annotations

from xm.pipeline.sources.base import OPENAI_LOGIT_SCALE, ArrayRef, Part, Sample, Source, SourceOptions

__all__ = ["OPENAI_LOGIT_SCALE", "ArrayRef", "Part", "Sample", "Source", "SourceOptions"]
