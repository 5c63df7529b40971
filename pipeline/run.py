"""The embed job end to end: read -> prepare -> embed -> write, streaming on Ray Data.

`ParquetShards` read tasks fused with `prepare_batch` (tokenize, chunk, reject) -> `EmbedStage`
actor pool (`num_gpus=1` each on GPU; fixed, or growing with the GPU nodes: `pipeline.elastic`;
length-sorted token-budget batches inside each call) ->
`FragmentWriter` tasks (uncommitted Lance fragments) -> driver commits windows atomically.
Every stage is sized to leave CPUs free for the others (an actor pool holding all CPUs deadlocks
reads and writes: ray-lance spec §0.7).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import lance
import pyarrow as pa
import ray

from model import EncoderInfo, ModelDescription, TextTokenizer, describe_model
from pipeline.commit import CommitSummary, LanceCommitter, Mode, Resume, commit_skipped_files, staging_url
from pipeline.config import JobConfig
from pipeline.dedup import index_source_ids, remove_ids
from pipeline.diff import LookupSpec, ensure_id_index, missing_ids, opened
from pipeline.elastic import choose_layout
from pipeline.embed import EmbedSpec, EmbedStage, vector_column
from pipeline.partitions import Partitions, select, with_partition_columns
from pipeline.preflight import preflight
from pipeline.prepare import MODALITY, REJECT, SOURCE_ROWS, PrepareSpec, prepare_batch
from pipeline.ray_shim import autoscaler_max_gpus
from pipeline.read import ParquetShards, column_roles, read_source, skip_recorder, skipped_files
from pipeline.report import build_report, save_report
from pipeline.sink import build_vector_indexes, table_uri, write_dataset
from pipeline.storage import StorageConfig
from pipeline.table_meta import MULTIVECTOR, MULTIVECTOR_DIM, TableMetadata

log = logging.getLogger("embedlake")

LIGHT_TASK_CPUS = 0.25  # read, prepare and write tasks: small, so they always fit beside the actors


@dataclass(frozen=True)
class ResolvedJob:
    """The job with every default decided against the model and the cluster."""

    cfg: JobConfig
    info: EncoderInfo
    tokenizer: TextTokenizer
    task: str | None
    prompt: str | None  # the models with prompts (jina-v4): the documents' prompt, else None
    dims: tuple[int, ...]
    window: int
    actors: int  # the pool's maximum (its size when fixed)
    min_actors: int  # below actors: an autoscaling pool (pipeline.elastic)
    gpus_per_actor: int
    cpu_threads: int  # torch threads of a CPU encoder actor
    prepare_tasks: int  # concurrent read+prepare tasks: the cores the actors leave free
    storage: StorageConfig
    layout_why: str = ""  # how device and pool size were chosen, for the log
    initial_actors: int | None = None  # the pool's start size when it must ask the autoscaler for GPU nodes


def resolve(cfg: JobConfig, *, cluster: dict | None = None, max_gpus: int | None = None,
            described: ModelDescription | None = None) -> ResolvedJob:
    """`described`: the model as pre-flight found it (describing it again hashes its weights again).
    `cluster` (resources up now) and `max_gpus` (GPUs its autoscaler can reach, None: unknown) are read
    from the connected Ray when `cluster` is None."""
    storage = StorageConfig.from_env(cfg.storage_options)
    if described is None:
        described = describe_model(cfg.encode.model, storage_options=storage.fsspec_options(cfg.encode.model))
    info = described.info
    task = cfg.encode.task if cfg.encode.task is not None else info.default_task
    if task is not None and task not in info.tasks:
        raise ValueError(f"unknown task {task!r} for {info.name}; valid tasks: {', '.join(info.tasks) or 'none'}")
    dims = info.check_dims(cfg.encode.dims) or (info.dim,)
    prompt = check_capabilities(cfg, info)
    window = min(cfg.chunking.max_length or info.max_length, info.max_length)
    if cluster is None:
        cluster, max_gpus = ray.cluster_resources(), autoscaler_max_gpus()
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    cpu_actors = max(1, int(cpus // 2 // max(cfg.encode.cpus_per_actor, 1)))
    layout = choose_layout(cfg.encode.device, cfg.encode.actors, gpus_now=gpus, max_gpus=max_gpus,
                           cpu_actors=cpu_actors)
    actors = layout.max_actors
    # A CPU actor reserves `cpus_per_actor` for scheduling but computes with its share of the cluster's
    # cores: the light read/prepare/write tasks beside it need little, and one thread wastes the rest.
    cpu_threads = max(int(cfg.encode.cpus_per_actor), cpus // actors, 1)
    # Read+prepare tasks ask for a fraction of a CPU so they always fit beside the actors, but more of
    # them than free cores only adds worker processes (each ~1 s of imports) competing with encoding.
    # GPU actors beyond the GPUs up will come with nodes of their own (and their CPUs).
    placed = min(actors, gpus) if layout.device == "gpu" else actors
    prepare_tasks = max(1, int(cpus - placed * cfg.encode.cpus_per_actor))
    return ResolvedJob(
        cfg=cfg,
        info=info,
        tokenizer=described.tokenizer,
        task=task,
        prompt=prompt,
        dims=dims,
        window=window,
        actors=actors,
        min_actors=layout.min_actors,
        gpus_per_actor=1 if layout.device == "gpu" else 0,
        layout_why=layout.why,
        initial_actors=layout.initial_actors,
        cpu_threads=cpu_threads,
        prepare_tasks=prepare_tasks,
        storage=storage,
    )


def check_capabilities(cfg: JobConfig, info: EncoderInfo) -> str | None:
    """The options only some models serve (prompts, multi-vectors, images), checked against this one; returns
    the documents' prompt (None for models without prompts)."""
    prompt = cfg.encode.prompt
    if not info.prompts:
        if prompt is not None:
            raise ValueError(f"--prompt is for models with query/passage prompts (jina-v4); {info.name} "
                             f"({info.family}) takes none: its tasks carry their instruction")
    else:
        prompt = info.default_prompt if prompt is None else prompt
        if prompt not in info.prompts:
            raise ValueError(f"--prompt must be one of {', '.join(info.prompts)} for {info.name}; got {prompt!r}")
    if cfg.encode.multi_vector and info.multi_vector_dim != MULTIVECTOR_DIM:
        raise ValueError(f"--multi-vector needs a model with {MULTIVECTOR_DIM}-d per-token vectors (jina-v4); "
                         f"{info.name} ({info.family}) has {info.multi_vector_dim or 'none'}")
    if cfg.source.image_column and "image" not in info.modalities:
        raise ValueError(f"--image-column needs a model that embeds images (jina-v4); {info.name} ({info.family}) "
                         "embeds text only")
    return prompt


def output_schema(job: ResolvedJob, source: pa.Schema, partition_keys: tuple[str, ...] = ()) -> pa.Schema:
    """The table contract: one row per chunk, a vector column per dim, provenance, kept columns, and a
    backfill's partition columns (strings, as Hive paths hold them)."""
    vtype = pa.float16() if job.cfg.encode.vector_dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.string()),
        pa.field("chunk", pa.int32()),
        pa.field("start", pa.int32()),
        pa.field("end", pa.int32()),
        pa.field("text", pa.string()),
        *[pa.field(vector_column(d), pa.list_(vtype, d)) for d in job.dims],
        *([pa.field(MULTIVECTOR, pa.list_(pa.list_(vtype, MULTIVECTOR_DIM)))] if job.cfg.encode.multi_vector else []),
        *([pa.field(MODALITY, pa.string())] if job.cfg.source.image_column else []),
        pa.field("content_hash", pa.string()),
        pa.field("model", pa.string()),
        *[source.field(c) for c in job.cfg.source.keep_columns],
        *[pa.field(k, pa.string()) for k in partition_keys],
    ]
    return pa.schema(fields)


def query_task(job: ResolvedJob) -> str | None:
    """The task queries of this table are embedded with. Documents under the model's default task pair with its
    query task (jina-v3: retrieval.passage -> retrieval.query). Any other task is symmetric and queries use it too;
    so do models whose prompt, not task, tells queries from documents (jina-v4: the adapter must be the same)."""
    if job.info.prompts or job.task != job.info.default_task:
        return job.task
    return job.info.query_task


def table_metadata(job: ResolvedJob, kind: str, partitions: str | None = None) -> TableMetadata:
    """What the table records about this run; `job_key` is the same for every run of the same command."""
    cfg = job.cfg
    meta = TableMetadata(
        run_id=cfg.run_id,
        job_key="",
        state="running",
        model=job.info.identity,
        model_ref=cfg.encode.model,
        model_family=job.info.family,
        task=job.task,
        query_task=query_task(job),
        dims=job.dims,
        vector_dtype=cfg.encode.vector_dtype,
        precision=cfg.encode.precision,
        chunking={"mode": cfg.chunking.mode, "chunk_tokens": cfg.chunking.chunk_tokens,
                  "chunk_sentences": cfg.chunking.chunk_sentences, "late": cfg.chunking.late and cfg.chunking.mode != "none",
                  "window": job.window, "overlap": cfg.chunking.overlap},
        written_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        prompt=job.prompt,
        query_prompt=job.info.query_prompt,
        multi_vector=cfg.encode.multi_vector,
        image_column=cfg.source.image_column,
    )
    vector_settings = {k: v for k, v in meta.to_metadata().items() if k not in ("run_id", "job_key", "state", "written_at")}
    # --on-bad-file is no part of the command's identity: a run failed on a bad file resumes with `skip`.
    source = {k: v for k, v in dataclasses.asdict(cfg.source).items() if k != "on_bad_file"}
    command = {"kind": kind, "input": cfg.source.input, "source": source,
               "table": table_uri(cfg.sink.db, cfg.sink.table), "partitions": partitions, **vector_settings}
    key = hashlib.sha256(json.dumps(command, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dataclasses.replace(meta, job_key=key)


def build_dataset(job: ResolvedJob, files: list[str], lookup: LookupSpec | None = None,
                  ids_index: LookupSpec | None = None, partitions: Partitions | None = None,
                  skipped: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """The job's stages; `skipped` (`pipeline.read.skip_recorder`) takes the bad files, else they fail it."""
    cfg = job.cfg
    late = cfg.chunking.late and cfg.chunking.mode != "none"
    # Read and prepare share one task pool size, so Ray fuses them into one task per file; there are
    # never more read tasks than files.
    tasks = min(job.prepare_tasks, len(files))
    # Read+prepare tasks keep Ray Data 2.60's retry setting, max_retries=-1 on system failures (a dead
    # worker or node): they are pure functions of their files, so a retry only repeats work. Setting it
    # here would need the same value on the read (fusion requires equal remote args).
    ds = read_source(cfg.source, job.storage, files, num_cpus=LIGHT_TASK_CPUS, concurrency=tasks, skipped=skipped)
    units_source = cfg.source  # the columns units carry on: the kept ones, and a backfill's partition columns
    if partitions is not None:
        ds = ds.map_batches(with_partition_columns, fn_kwargs={"partitions": partitions}, batch_format="pyarrow",
                            num_cpus=LIGHT_TASK_CPUS, compute=ray.data.TaskPoolStrategy(size=tasks))
        units_source = dataclasses.replace(cfg.source, keep_columns=cfg.source.keep_columns + partitions.keys)
    model_options = tuple(sorted(job.storage.fsspec_options(cfg.encode.model).items()))  # for s3:// model dirs
    prep = PrepareSpec(source=units_source, chunking=cfg.chunking, model=cfg.encode.model, task=job.task,
                       prompt=job.prompt, image_storage=job.storage if cfg.source.image_column else None,
                       window=job.window, storage_options=model_options, revision=job.info.revision,
                       tokenizer_ref=ray.put(job.tokenizer), lookup=lookup, ids_index=ids_index)
    ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": prep}, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS,
                        compute=ray.data.TaskPoolStrategy(size=tasks))
    spec = EmbedSpec(
        model=cfg.encode.model,
        task=job.task,
        prompt=job.prompt,
        multi_vector=cfg.encode.multi_vector,
        images=bool(cfg.source.image_column),
        dims=job.dims,
        vector_dtype=cfg.encode.vector_dtype,
        precision=cfg.encode.precision,
        late=late,
        window=job.window,
        overlap=cfg.chunking.overlap,
        keep_columns=units_source.keep_columns,
        max_batch_tokens=cfg.encode.max_batch_tokens,
        cpu_threads=job.cpu_threads,
        storage_options=model_options,
        revision=job.info.revision,
    )
    return ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"spec": spec},
        # A call's output is one writer result: the commit window can close no finer than that.
        batch_size=min(cfg.encode.sort_window, cfg.sink.commit_every_rows),
        batch_format="pyarrow",
        # min < max: Ray Data adds actors while work queues and the autoscaler adds GPU nodes for them; an
        # actor lost with its node is restarted elsewhere and its blocks retried (max_restarts=-1).
        compute=ray.data.ActorPoolStrategy(min_size=job.min_actors, max_size=job.actors,
                                           initial_size=job.initial_actors),
        num_gpus=job.gpus_per_actor,
        num_cpus=cfg.encode.cpus_per_actor,
    )


def ensure_ray() -> bool:
    """Join the cluster RAY_ADDRESS names (set under `ray job submit`); otherwise start a private local
    one rather than attaching to whatever cluster happens to run on this machine. True when this call
    started that private cluster: nothing will ever add nodes to it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", include_dashboard=False)
    return not address


def check_placeable(job: ResolvedJob, gpus: int) -> None:
    """On a private local cluster (no autoscaler), one-GPU actors beyond the machine's GPUs would wait for a
    node that never comes: the job would hang instead of failing. Say so before it starts."""
    if job.gpus_per_actor and gpus < job.min_actors:
        raise ValueError(
            f"--device gpu needs {job.min_actors} GPU(s) for its encoder actors, but this machine has {gpus} and "
            "the job runs on a local Ray of its own, which no autoscaler grows: submit it to a Ray cluster with "
            "GPUs or an autoscaler (RAY_ADDRESS, `ray job submit`), or pass --device auto or cpu"
        )


def run_job(cfg: JobConfig, *, mode: Mode | None = None, delete_missing: bool = False,
            partitions: str | None = None) -> dict:
    """Run the job on the current Ray cluster (local if none); return and store the run report.

    `mode` defaults to the configured write mode; `reembed` updates a table in place (refused when
    the table was embedded with other settings), `full` re-embeds all of it as a staged replacement.
    Every mode resumes: documents the table (or the staged replacement) already holds with the same
    content hash are counted as unchanged and cost no encoder work. A `reembed` also counts the
    table's documents that the source no longer has, and deletes them with `delete_missing`. A
    `backfill` reads the Hive partitions `partitions` selects (`pipeline.partitions`), carries their
    columns into the table and makes the table's rows of those partitions equal the source's: the same
    diff, plus deletion of their documents gone from the source. Backfills of different partitions
    may run at once on one table (their commits retry on conflicts; ids must be unique across
    partitions).
    """
    t0 = time.perf_counter()
    checked = preflight(cfg)  # input, output and model, before Ray starts (issue #13)
    mode = mode or cfg.sink.mode
    files, source = checked.files, checked.schema
    parts = None
    if mode == "backfill":
        if not partitions:
            raise ValueError("backfill needs --partitions: a list of partition paths or a filter over partition columns")
        parts = select(cfg.source.input, files, partitions)
        files = sorted(parts.values)
    private = ensure_ray()
    job = resolve(cfg, described=checked.model)
    if private:
        check_placeable(job, int(ray.cluster_resources().get("GPU", 0)))
    log.info("encoder pool: %s", job.layout_why)
    log.info("embedlake job %s", json.dumps(cfg.to_record(lambda o: StorageConfig(o).redacted()), default=str))
    uri = table_uri(cfg.sink.db, cfg.sink.table)
    committer = LanceCommitter(
        uri, output_schema(job, source, parts.keys if parts else ()), job.storage, mode,
        table_metadata(job, mode, partitions), commit_every_rows=cfg.sink.commit_every_rows,
        commit_every_s=cfg.sink.commit_every_s,
    )
    resume = committer.begin()
    lookup = _lookup(uri, resume, job.storage, cfg.run_id)
    if resume.resumed:
        log.info("resuming: %d rows of version %s already committed", resume.rows_before, resume.base_version)
    skipped = skip_recorder(cfg.source)
    ids_uri = staging_url(uri, f"{committer.metadata.job_key}-ids.lance")
    ids_index = index_source_ids(files, cfg.source.id_column, job.storage, ids_uri, num_cpus=LIGHT_TASK_CPUS,
                                 concurrency=min(job.prepare_tasks, len(files)), run_id=cfg.run_id, skipped=skipped)
    # A skipped file's documents would look gone from the source: never delete on their account.
    may_delete = not skipped_files(skipped)
    if mode == "reembed" and lookup is not None and delete_missing and may_delete:
        _reconcile_missing(job, files, lookup, committer, skipped=skipped)
    if parts is not None and lookup is not None and may_delete:  # the partitions' rows follow the source
        _reconcile_missing(job, files, lookup, committer, where=parts.predicate, skipped=skipped)
    summary = write_dataset(build_dataset(job, files, lookup, ids_index, parts, skipped), committer,
                            writer_num_cpus=LIGHT_TASK_CPUS)
    if mode == "reembed" and lookup is not None and not (delete_missing and may_delete):
        summary = dataclasses.replace(summary, missing_kept=_missing_count(lookup, summary))
    remove_ids(ids_uri, job.storage)
    commit_skipped_files(committer.rejected_uri, job.storage, cfg.run_id, skipped_files(skipped))
    if not committer.staged:
        ensure_id_index(uri, job.storage.lance_options())  # the next run's lookups and replacements
    indexes = {}
    if cfg.sink.index:
        cols = committer.metadata.vector_columns()
        indexes = build_vector_indexes(cfg.sink.db, cfg.sink.table, cols, job.storage.lance_options())
    report = build_report(describe_job(job, mode), summary, wall_s=time.perf_counter() - t0, indexes=indexes,
                          files_skipped=skipped_files(skipped))
    in_source = int(summary.stats.get(SOURCE_ROWS, 0))
    if report["documents_read"] != in_source:  # the files' footers against every row's recorded fate
        raise RuntimeError(f"counts do not reconcile: the input files hold {in_source} rows, but "
                           f"{report['documents_read']} were embedded, unchanged or rejected; this is a bug")
    report["report_path"] = save_report(report, cfg.sink.db, cfg.sink.table, job.storage)
    return report


def _lookup(uri: str, resume: Resume, storage: StorageConfig, run_id: str) -> LookupSpec | None:
    """What prepare tasks diff against: the base version, indexed on `id` first when it is the live table."""
    if resume.base_version is None:
        return None
    version = resume.base_version
    if not resume.staged:
        ensure_id_index(uri, storage.lance_options())  # commits an index version; the data is the same
        version = lance.dataset(uri, storage_options=storage.lance_options()).version
    return LookupSpec(uri, version, tuple(sorted(storage.lance_options().items())), run_id)


def _missing_count(lookup: LookupSpec, summary: CommitSummary) -> int:
    """Documents the table held that the source no longer has, counted without a join: every id the
    table holds once (the committer's invariant), every source id once (later ones are rejected as
    duplicates), so the table's documents less those the run found unchanged or changed are missing."""
    ds = opened(lookup)
    found = summary.documents.get("unchanged", 0) + summary.documents.get("changed", 0)
    return ds.count_rows(filter="chunk = 0") - found


def _reconcile_missing(job: ResolvedJob, files: list[str], lookup: LookupSpec, committer: LanceCommitter,
                       *, where: str | None = None, skipped: ray.actor.ActorHandle | None = None) -> None:
    """Delete, in windows, the table's documents that the source lost (a join of ids: see `missing_ids`)."""
    src = job.cfg.source
    ids = ParquetShards(files, (src.id_column,), job.storage, roles=column_roles(src), skipped=skipped)
    source_ids = ray.data.read_datasource(ids, num_cpus=LIGHT_TASK_CPUS, override_num_blocks=len(files)).map_batches(
        lambda t: pa.table({"id": t[src.id_column].cast(pa.string())}), batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    missing = missing_ids(lookup, source_ids, partitions=max(1, len(files) // 8), where=where)
    for batch in missing.iter_batches(batch_format="pyarrow", batch_size=job.cfg.sink.commit_every_rows):
        committer.delete_documents(batch["id"].to_pylist())


def describe_job(job: ResolvedJob, mode: str) -> dict:
    """The plain facts about a job that its report states."""
    cfg = job.cfg
    return {
        "run_id": cfg.run_id,
        "kind": mode,
        "input": cfg.source.input,
        "db": cfg.sink.db,
        "table": cfg.sink.table,
        "model": job.info.identity,
        "task": job.task,
        "dims": list(job.dims),
        "device": "gpu" if job.gpus_per_actor else "cpu",
        "actor_bounds": [job.min_actors, job.actors],
        "chunking": {"mode": cfg.chunking.mode, "late": cfg.chunking.late and cfg.chunking.mode != "none",
                     "window": job.window},
    }


__all__ = ["REJECT", "ResolvedJob", "build_dataset", "output_schema", "resolve", "run_job"]
