"""Frozen job configuration, one dataclass per concern, passed whole to the stages.

`JobConfig.to_record()` is what gets logged once and stored beside the table (secrets redacted).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Literal, get_args

ChunkingMode = Literal["none", "fixed", "sentences"]
WriteMode = Literal["create", "append", "overwrite"]
VectorDType = Literal["float32", "float16"]
# Compute precisions: the same as model.PRECISIONS (a test checks), declared here because light
# workers import this module and must not import torch.
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class SourceConfig:
    input: str  # directory, glob or URL of Parquet files
    id_column: str = "id"
    text_column: str = "text"
    title_column: str | None = None  # when set, the embedded text is title + " " + text
    keep_columns: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        cols = [self.id_column, self.text_column]
        if self.title_column:
            cols.append(self.title_column)
        return cols + [c for c in self.keep_columns if c not in cols]


@dataclass(frozen=True)
class ChunkingConfig:
    mode: ChunkingMode = "none"
    chunk_tokens: int = 256
    chunk_sentences: int = 5
    late: bool = True  # late chunking when chunking (pool spans of the whole document's token states)
    max_length: int | None = None  # tokens per model window; None = the model maximum
    overlap: int | None = None  # long late chunking window overlap; None = min(512, window // 4)

    def validate(self) -> None:
        if self.mode not in ("none", "fixed", "sentences"):
            raise ValueError(f"chunking must be one of none, fixed, sentences; got {self.mode!r}")
        if self.chunk_tokens < 1 or self.chunk_sentences < 1:
            raise ValueError("--chunk-tokens and --chunk-sentences must be >= 1")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"--max-length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class EncodeConfig:
    model: str  # local dir, fsspec URL or hub id
    task: str | None = None  # resolved against the model: retrieval.passage for jina-v3
    dims: tuple[int, ...] = ()  # empty = the full dimension only
    vector_dtype: VectorDType = "float32"
    # Compute precision: "auto" = bf16 where the hardware multiplies bf16 natively (CUDA, CPUs with
    # AMX or AVX512-BF16), else float32; "float32" for reference-exact vectors. See model.loading.resolve_dtype.
    precision: Precision = "auto"
    max_batch_tokens: int | None = None  # None = the encoder's default for its device
    actors: int | None = None  # None = one per GPU, or a CPU count on CPU-only clusters
    cpus_per_actor: float = 1.0
    sort_window: int = 4096  # documents per actor call, sorted by length inside it (spec §4: >= 4k keeps ~97% fill)


@dataclass(frozen=True)
class SinkConfig:
    db: str  # LanceDB URI: local path or s3://bucket/prefix
    table: str
    mode: WriteMode = "create"
    index: bool = False
    commit_every_rows: int = 100_000
    commit_every_s: float = 60.0


@dataclass(frozen=True)
class JobConfig:
    source: SourceConfig
    encode: EncodeConfig
    sink: SinkConfig
    chunking: ChunkingConfig = ChunkingConfig()
    storage_options: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def to_record(self, redact) -> dict:
        """A JSON-ready view with storage secrets redacted by `redact(options) -> options`."""
        record = dataclasses.asdict(self)
        record["storage_options"] = redact(self.storage_options)
        return record
