"""Frozen job configuration, one dataclass per concern, passed whole to the stages.

Each field is written once here: its type, its default and its bounds. Every way options arrive (flags, a
`--config` YAML file, `python -m jobs.embed`, a `JobConfig` built in Python) meets the same checks in
`__post_init__`, and an error names the option as the command line spells it (`--max-batch-tokens must be
>= 1, got 0`): `jobs/cli.py` derives its flags' names, defaults and choices from these fields.

`JobConfig.to_record()` is what gets logged once and stored beside the table (secrets redacted).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import uuid
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args

ChunkingMode = Literal["none", "fixed", "sentences"]
WriteMode = Literal["create", "append", "overwrite"]
VectorDType = Literal["float32", "float16"]
# Compute precisions: the same as model.PRECISIONS (a test checks), declared here because light
# workers import this module and must not import torch.
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
BadFilePolicy = Literal["fail", "skip"]  # pipeline.read: what a corrupt, truncated or ill-shaped input file does
# Where encoder actors run (issue #17): auto = GPU if the cluster has one when the job starts, else CPU;
# gpu = one-GPU actors even while no GPU node is up (the autoscaler adds them); cpu = never a GPU.
Device = Literal["auto", "gpu", "cpu"]


def option(default: Any = MISSING, *, flag: str | None = None, at_least: float | None = None,
           above: float | None = None) -> Any:
    """A config field with a lower bound (`at_least` inclusive, `above` exclusive; for a tuple, on each
    item), or named in errors by a `flag` other than `--field-name` (JobConfig's parts: by their field name)."""
    metadata = {"flag": flag, "at_least": at_least, "above": above}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def flag_of(f: dataclasses.Field) -> str:
    """How the user names a field: its command line flag (YAML keys are the same without the dashes)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A config class's field annotations, evaluated (this module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def without_none(kind: Any) -> Any:
    """X for the annotation `X | None`, else the annotation itself."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [a for a in get_args(kind) if a is not type(None)]
    return kind


def check_value(name: str, value: Any, kind: Any, *, at_least: float | None = None, above: float | None = None) -> None:
    """Raise a one-line ValueError unless `value` is of type `kind` and within the bounds."""
    if value is None and without_none(kind) is not kind:
        return
    kind = without_none(kind)
    args, origin = get_args(kind), typing.get_origin(kind)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {', '.join(args)}; got {value!r}")
    elif origin is tuple:  # tuple[X, ...]
        if not isinstance(value, tuple):
            raise ValueError(f"{name} must be a tuple, got {value!r}")
        for item in value:
            check_value(name, item, args[0], at_least=at_least, above=above)
    elif origin is dict:  # dict[str, str]
        if not isinstance(value, dict) or not all(isinstance(x, str) for kv in value.items() for x in kv):
            raise ValueError(f"{name} must be a mapping of strings to strings, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif kind in (int, float):
        # bool is an int subclass, and an int is a fine float; NaN fails every bound below
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
        if at_least is not None and not value >= at_least:
            raise ValueError(f"{name} must be >= {at_least}, got {value!r}")
        if above is not None and not value > above:
            raise ValueError(f"{name} must be > {above}, got {value!r}")
    elif not isinstance(value, kind):
        raise ValueError(f"{name} must be a {'string' if kind is str else kind.__name__}, got {value!r}")


def check_fields(cfg: Any) -> None:
    """Check every field of a config dataclass against its annotation and bounds."""
    kinds = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        check_value(flag_of(f), getattr(cfg, f.name), kinds[f.name],
                    at_least=f.metadata.get("at_least"), above=f.metadata.get("above"))


@dataclass(frozen=True)
class ActorRange:
    """The encoder pool's size: `N` (fixed), `MIN..MAX` (an autoscaling pool) or `MIN..` (up to the GPUs the
    cluster can reach, decided by `pipeline.elastic`). Parsed here once; `max is None` only for `MIN..`."""

    min: int
    max: int | None

    def __post_init__(self) -> None:
        for value in (self.min, self.max):
            if value is not None:
                check_value("--actors", value, int, at_least=1)
        if self.max is not None and self.max < self.min:
            raise ValueError(f"--actors MIN..MAX needs MIN <= MAX, got {self}")

    @classmethod
    def of(cls, value: Any) -> ActorRange:
        """An ActorRange from what flags, YAML or Python give: an int, "N", "MIN..MAX", "MIN..", or one already."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value, value)
        if isinstance(value, str):
            low, dots, high = value.strip().partition("..")
            if low.strip().isdigit() and (not dots or not high.strip() or high.strip().isdigit()):
                return cls(int(low), (int(high) if high.strip() else None) if dots else int(low))
        raise ValueError(f"--actors must be N, MIN..MAX or MIN.. (integers), got {str(value)!r}")

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return str(self.min) if self.fixed else f"{self.min}..{'' if self.max is None else self.max}"


@dataclass(frozen=True)
class SourceConfig:
    input: str  # directory, glob or URL of Parquet files
    id_column: str = "id"
    text_column: str = "text"
    title_column: str | None = None  # when set, the embedded text is title + " " + text
    # image bytes, or paths/URLs of images (read through fsspec with the job's storage options); a row with an
    # image and no text is an image document, one with both becomes a text row and an image row (`modality`)
    image_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    # skip: a file that cannot be read, or lacks the job's columns, is left out and listed in the report
    on_bad_file: BadFilePolicy = "fail"

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def columns(self) -> list[str]:
        cols = [self.id_column, self.text_column]
        if self.title_column:
            cols.append(self.title_column)
        if self.image_column:
            cols.append(self.image_column)
        return cols + [c for c in self.keep_columns if c not in cols]


@dataclass(frozen=True)
class ChunkingConfig:
    mode: ChunkingMode = option("none", flag="--chunking")
    chunk_tokens: int = option(256, at_least=1)
    chunk_sentences: int = option(5, at_least=1)
    # late chunking when chunking (pool spans of the whole document's token states)
    late: bool = option(True, flag="--late-chunking")
    max_length: int | None = option(None, at_least=8)  # tokens per model window; None = the model maximum
    # long late chunking window overlap; None = min(512, window // 4). The bound by the window is
    # checked where the window is known (model.tokenization.long_windows); here only where it is given.
    overlap: int | None = option(None, at_least=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.overlap is not None and self.max_length is not None and self.overlap >= self.max_length:
            raise ValueError(f"--overlap must be < --max-length ({self.max_length}), got {self.overlap}")


@dataclass(frozen=True)
class EncodeConfig:
    model: str  # local dir, fsspec URL or hub id
    task: str | None = None  # resolved against the model: retrieval.passage for jina-v3, retrieval for jina-v4
    prompt: str | None = None  # jina-v4's query | passage prefix (default passage); v3 tasks carry their own
    multi_vector: bool = False  # jina-v4: also store the 128-d per-token vectors (column multivector_128)
    dims: tuple[int, ...] = option((), at_least=1)  # empty = the full dimension only
    vector_dtype: VectorDType = "float32"
    # Compute precision: "auto" = bf16 where the hardware multiplies bf16 natively (CUDA, CPUs with
    # AMX or AVX512-BF16), else float32; "float32" for reference-exact vectors. See model.loading.resolve_dtype.
    precision: Precision = "auto"
    # None = the encoder's default for its device (model.loading.DEFAULT_MAX_BATCH_TOKENS)
    max_batch_tokens: int | None = option(None, at_least=1)
    device: Device = "auto"
    # None = on gpu 1..the GPUs the cluster can reach; on auto/cpu one per GPU, or a CPU count (pipeline.elastic)
    actors: ActorRange | None = None
    cpus_per_actor: float = option(1.0, above=0)
    # documents per actor call, sorted by length inside it (spec §4: >= 4k keeps ~97% fill)
    sort_window: int = option(4096, at_least=1)

    def __post_init__(self) -> None:
        if self.actors is not None:  # `actors=4` or "1..4": the one parse, before the type check
            object.__setattr__(self, "actors", ActorRange.of(self.actors))
        check_fields(self)


@dataclass(frozen=True)
class SinkConfig:
    db: str = option(flag="--output")  # LanceDB URI: local path or s3://bucket/prefix
    table: str
    mode: WriteMode = "create"
    index: bool = False
    commit_every_rows: int = option(100_000, at_least=1)
    commit_every_s: float = option(60.0, above=0)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class JobConfig:
    source: SourceConfig = option(flag="source")
    encode: EncodeConfig = option(flag="encode")
    sink: SinkConfig = option(flag="sink")
    chunking: ChunkingConfig = option(ChunkingConfig(), flag="chunking")
    storage_options: dict[str, str] = field(default_factory=dict, metadata={"flag": "--storage-option"})
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12], metadata={"flag": "run_id"})

    def __post_init__(self) -> None:
        check_fields(self)

    def to_record(self, redact) -> dict:
        """A JSON-ready view with storage secrets redacted by `redact(options) -> options`."""
        record = dataclasses.asdict(self)
        record["storage_options"] = redact(self.storage_options)
        return record
