"""What a table records about how it was embedded: one typed record, one writer, one reader.

Stored as Lance *table metadata* (the manifest's string map) so it changes in the same commit as the
data it describes where that matters (a staged overwrite switches data and metadata in one
`Restore`). `query`, `eval` and `reembed` read it through `TableMetadata.from_metadata`; nothing
parses the raw strings elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

State = Literal["running", "complete"]

MULTIVECTOR_DIM = 128  # jina-v4's multi-vector projector output (config `multi_vector_projector_dim`)
MULTIVECTOR = f"multivector_{MULTIVECTOR_DIM}"  # list<fixed_size_list<float, 128>>: LanceDB's multivector layout

# The settings that decide what a vector means: a table embedded with other values is not comparable.
VECTOR_SETTINGS = ("model", "task", "prompt", "dims", "multi_vector", "vector_dtype", "precision", "chunking")
# Fields added after tables existed, with the value that a table written before them has.
LATER_FIELDS = {"prompt": "", "query_prompt": "", "multi_vector": "False", "image_column": ""}


@dataclass(frozen=True)
class TableMetadata:
    run_id: str  # the run that last completed (or is writing) this table
    job_key: str  # deterministic hash of the command's settings: a re-run of the same command has it too
    state: State  # "running" until the run that wrote the table finished
    model: str  # model identity, name@revision
    model_ref: str  # how the run named the model (dir, URL or hub id): queries load it from there
    model_family: str
    task: str | None
    query_task: str | None
    dims: tuple[int, ...]
    vector_dtype: str
    precision: str
    chunking: dict = field(default_factory=dict)  # mode, sizes, late, window, overlap
    written_at: str = ""
    prompt: str | None = None  # jina-v4: the prompt documents were embedded with (passage)
    query_prompt: str | None = None  # jina-v4: the prompt queries need (query)
    multi_vector: bool = False  # the table has the per-token column (multivector_128)
    image_column: str | None = None  # the source's image column: the table has image rows (`modality`)

    def to_metadata(self) -> dict[str, str]:
        record = asdict(self)
        out = {k: ("" if v is None else str(v)) for k, v in record.items() if k not in ("dims", "chunking")}
        out["dims"] = ",".join(map(str, self.dims))
        out["chunking"] = json.dumps(self.chunking, sort_keys=True)
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, where: str = "table") -> TableMetadata:
        meta = {**LATER_FIELDS, **meta}
        missing = [f.name for f in fields(cls) if f.name not in meta and f.name != "written_at"]
        if missing:
            raise ValueError(
                f"{where} has no embedlake metadata ({', '.join(missing)} missing): it was not written by "
                "embedlake, or its first run was interrupted before its first commit; re-run that job"
            )
        return cls(
            run_id=meta["run_id"],
            job_key=meta["job_key"],
            state="complete" if meta["state"] == "complete" else "running",
            model=meta["model"],
            model_ref=meta["model_ref"],
            model_family=meta["model_family"],
            task=meta["task"] or None,
            query_task=meta["query_task"] or None,
            dims=tuple(int(d) for d in meta["dims"].split(",") if d),
            vector_dtype=meta["vector_dtype"],
            precision=meta["precision"],
            chunking=json.loads(meta["chunking"]),
            written_at=meta.get("written_at", ""),
            prompt=meta["prompt"] or None,
            query_prompt=meta["query_prompt"] or None,
            multi_vector=meta["multi_vector"] == "True",
            image_column=meta["image_column"] or None,
        )

    def vector_columns(self) -> list[str]:
        """The columns a query can search: one per dim, then the multivector column if the table has it."""
        return [f"vector_{d}" for d in self.dims] + ([MULTIVECTOR] if self.multi_vector else [])

    def setting_differences(self, requested: TableMetadata) -> list[str]:
        """`name: table has X, requested Y` for every vector-defining setting that differs."""
        return [
            f"{name}: table has {getattr(self, name)!r}, requested {getattr(requested, name)!r}"
            for name in VECTOR_SETTINGS
            if getattr(self, name) != getattr(requested, name)
        ]
