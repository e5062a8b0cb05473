"""The HDF5 logit store: a model's logits (and labels) for many images, streamed in fixed-size chunks.

The schema is documented in docs/store-format.md. `LogitWriter` appends images to `<path>.partial`
and renames it onto `path` only when closed cleanly; `LogitStore` reads one file or a list of
shards as one store, chunk by chunk, with memory that does not grow with the data.

- `schema`: format constants, `ImageRecord`, `Chunk`, option checks;
- `writer`: `LogitWriter` (and `rows`: turning its inputs into checked rows);
- `reader`: `LogitStore` (and `shards`: opening and checking each file).
"""

from __future__ import annotations

from blda_tools.fileio import PARTIAL_SUFFIX, ensure_writable_dir, partial_path
from blda_tools.runtime.lazy import lazy_exports
from blda_tools.store.reader import LogitStore
from blda_tools.store.schema import (
    COMPRESSED_CHUNK_CACHE_BYTES,
    COMPRESSIONS,
    FLOAT16_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    KINDS,
    LOGIT_DTYPES,
    MAX_NAME_BYTES,
    Chunk,
    ImageRecord,
)

# The writer (and torch, which it converts from) loads on first use: reading needs neither.
__getattr__, __dir__ = lazy_exports(
    __name__, {"LogitWriter": "writer", "PreparedImage": "writer"}, globals()
)

__all__ = [
    "COMPRESSED_CHUNK_CACHE_BYTES",
    "COMPRESSIONS",
    "FLOAT16_MAX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_COLUMNS",
    "KINDS",
    "LOGIT_DTYPES",
    "MAX_NAME_BYTES",
    "PARTIAL_SUFFIX",
    "Chunk",
    "ImageRecord",
    "LogitStore",
    "LogitWriter",
    "PreparedImage",
    "ensure_writable_dir",
    "partial_path",
]
