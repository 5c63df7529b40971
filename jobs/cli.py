"""`embedlake` command line: parse flags (and an optional YAML config), build configs, call pipeline.

Launch the embed job:
  local:            embedlake embed --input data/ --output ./lancedb --table docs --model <dir>
  Ray job submit:   ray job submit --address http://head:8265 --working-dir . -- \\
                      python -m jobs.embed --input s3://bucket/corpus/ --output s3://bucket/lancedb \\
                      --table docs --model s3://bucket/models/jina-embeddings-v3 --dims 1024,256,64
  KubeRay:          see infra/kuberay/rayjob-embed.yaml (entrypoint `python -m jobs.embed ...`)

Job options are the fields of pipeline.config's dataclasses: their flag names, defaults, choices and checks live
there, once. A subcommand that runs a job (say `reembed`) calls `add_job_arguments(parser)`, adds its own flags,
then `build_config(merge_options(args))` after popping its own options, as `cmd_embed` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import (
    ChunkingConfig,
    EncodeConfig,
    JobConfig,
    SinkConfig,
    SourceConfig,
    check_value,
    field_types,
    flag_of,
    without_none,
)

if typing.TYPE_CHECKING:
    from pipeline.storage import StorageConfig

CONFIGS = (SourceConfig, EncodeConfig, ChunkingConfig, SinkConfig)  # the configs a job's options fill
NOT_OPTIONS = ("config", "command", "func")  # parser entries that are no job option


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# option name (flag without dashes, '_' for '-') -> (config class, field): the one map from options to configs
OPTION_FIELDS = {_dest(flag_of(f)): (cls, f) for cls in CONFIGS for f in dataclasses.fields(cls)}


def _add_option(group, flag: str, help: str, **kwargs) -> None:
    """A flag that sets a config field; its choices and the default in its help come from the field.

    Flags stay text (no argparse `type` or `choices`): the config dataclass checks them, as it checks YAML.
    """
    cls, f = OPTION_FIELDS[_dest(flag)]
    kind = field_types(cls)[f.name]
    if typing.get_origin(kind) is Literal:
        kwargs.setdefault("metavar", "{" + ",".join(typing.get_args(kind)) + "}")
    if f.default not in (dataclasses.MISSING, None, ()) and not isinstance(f.default, bool):
        help = f"{help} (default: {f.default})"
    group.add_argument(flag, help=help, **kwargs)


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options of any job that embeds a source into a table: source, model, chunking, output.

    A subcommand adds these, then its own flags; `merge_options` + `build_config` turn them into a `JobConfig`
    (an option it does not add keeps the config's default).
    """
    # Every flag defaults to None here: the defaults stay in the config dataclasses (see merge_options).
    p.add_argument("--config", help="YAML file with any of these options (keys as flag names, '-' or '_'); flags override it")
    source = p.add_argument_group("source")
    _add_option(source, "--input", "Parquet directory, glob or URL (local, s3://..., any fsspec URL)")
    _add_option(source, "--id-column", "document id column")
    _add_option(source, "--text-column", "text column")
    _add_option(source, "--title-column", "optional title column; the embedded text is title + ' ' + text")
    _add_option(source, "--image-column", "optional column of images (PNG/JPEG/WebP bytes, or paths/URLs read "
                                          "through fsspec) for models that embed images (jina-v4)")
    _add_option(source, "--keep-columns", "comma-separated input columns to carry into the table")
    _add_option(source, "--on-bad-file", "a corrupt, truncated or unreadable Parquet file, or one lacking the job's "
                                         "columns: fail the job naming it, or skip it and list it in the report")

    model = p.add_argument_group("model and encoding")
    _add_option(model, "--model", "model directory, fsspec URL of one, or Hugging Face hub id (cached)")
    _add_option(model, "--task", "task adapter/instruction (default: retrieval.passage for jina-v3, retrieval for jina-v4, none otherwise)")
    _add_option(model, "--prompt", "query or passage: jina-v4's text prefix (default: passage)")
    _add_option(model, "--multi-vector", "also store jina-v4's 128-d vector per token (column multivector_128), "
                                         "for late-interaction (MaxSim) search", action="store_true", default=None)
    _add_option(model, "--dims", "comma-separated Matryoshka dims, one vector column each (default: the full dim)")
    _add_option(model, "--vector-dtype", "stored vector type")
    _add_option(model, "--precision", "compute precision: auto = bfloat16 on CUDA and on CPUs with AMX or "
                                      "AVX512-BF16, else float32; float32 gives reference-exact vectors")
    _add_option(model, "--max-batch-tokens", "token budget per forward pass (default: the encoder's for its "
                                             "device; --dry-run prints it)")
    _add_option(model, "--device", "where encoder actors run: gpu asks for one-GPU actors even while no GPU node is "
                                   "up (the autoscaler adds them); auto = gpu if a GPU is up at start, else cpu")
    _add_option(model, "--actors", "encoder actors: N, or MIN..MAX for a pool that grows and shrinks with the GPU "
                                   "nodes, MIN.. for up to the GPUs the autoscaler can reach (default: with --device "
                                   "gpu 1.., otherwise one per GPU up, or a CPU count on CPU-only clusters)")
    _add_option(model, "--cpus-per-actor", "CPUs per encoder actor")
    _add_option(model, "--sort-window", "documents per encoder call, length-sorted inside")

    chunking = p.add_argument_group("chunking")
    _add_option(chunking, "--chunking", "how documents are cut into chunks")
    _add_option(chunking, "--chunk-tokens", "tokens per chunk with --chunking fixed")
    _add_option(chunking, "--chunk-sentences", "sentences per chunk with --chunking sentences")
    _add_option(chunking, "--late-chunking", "pool chunks from whole-document token states (default when chunking)",
                action="store_true", default=None)
    chunking.add_argument("--no-late-chunking", dest="late_chunking", action="store_false",
                          help="encode each chunk on its own (naive chunking)")
    _add_option(chunking, "--max-length", "tokens per model window (default: the model maximum)")
    _add_option(chunking, "--overlap", "long late chunking window overlap in tokens (default: min(512, window/4))")

    output = p.add_argument_group("output")
    _add_option(output, "--output", "LanceDB URI: local path or s3://bucket/prefix")
    _add_option(output, "--table", "table name in the LanceDB database")
    _add_option(output, "--index", "build an ANN index on each vector column after the write",
                action="store_true", default=None)
    _add_option(output, "--commit-every-rows", "rows per atomic commit window")
    _add_option(output, "--commit-every-s", "seconds per atomic commit window (whichever of rows or seconds comes first)")
    output.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="object store option for the reader and LanceDB (repeatable), e.g. endpoint=http://127.0.0.1:9000")


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """`embed`: the job options, its write mode and the dry run."""
    add_job_arguments(p)
    embed = p.add_argument_group("embed")
    _add_option(embed, "--mode", "table write mode; create fails if the table exists")
    embed.add_argument("--dry-run", action="store_true", default=None, help="print the plan and an estimate; start no encoders")
    embed.add_argument("--tokens-per-second", help="per-actor throughput for the --dry-run estimate")


def add_reembed_arguments(p: argparse.ArgumentParser) -> None:
    """`reembed`: the job options (the table must exist), plus what to do with documents gone from the source."""
    add_job_arguments(p)
    reembed = p.add_argument_group("reembed")
    reembed.add_argument("--delete-missing", action="store_true", default=None,
                         help="delete the table's documents that the source no longer has (default: count and keep them)")
    reembed.add_argument("--full", action="store_true", default=None,
                         help="re-embed every document (a model or settings change); readers see the old vectors "
                              "until one commit switches them over")


def add_backfill_arguments(p: argparse.ArgumentParser) -> None:
    """`backfill`: the job options over a Hive-partitioned input, plus the partitions to (re)build."""
    add_job_arguments(p)
    backfill = p.add_argument_group("backfill")
    backfill.add_argument("--partitions", help="partition paths (dt=2026-11-01,dt=2026-11-02; region=eu/dt=... for "
                          "several levels) or a filter over partition columns (\"dt >= '2026-01-01' and dt < '2026-02-01'\")")


def merge_options(args: argparse.Namespace) -> dict:
    """The options given: the config file's, overridden by flags given on the command line.

    An option given nowhere is absent, so it keeps the config dataclass's default.
    """
    known = {k for k in vars(args) if k not in NOT_OPTIONS}
    opts = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option names to values, got {loaded!r}")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in known:
                valid = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise ValueError(f"{args.config}: unknown option {key!r}; valid options: {valid}")
            opts[name] = value
    opts.update({k: v for k, v in vars(args).items() if k in known and v is not None})
    required = [flag_of(f) for dest, (_, f) in OPTION_FIELDS.items()
                if f.default is dataclasses.MISSING and dest in known and opts.get(dest) in (None, "")]
    if required:
        raise ValueError(f"missing required options: {', '.join(required)}")
    return opts


def read_text(value: Any, kind: Any) -> Any:
    """Flags are text, and YAML values may be: read a number, or a comma-separated list, where the option is
    one. Anything else is left as it is, for the config's check to accept or refuse with its one message."""
    kind = without_none(kind)
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, dict)):
            value = [value]  # one value for a list option: `dims: 256` means what `--dims 256` means
        return tuple(read_text(v, typing.get_args(kind)[0]) for v in value) if isinstance(value, list) else value
    if kind in (int, float) and isinstance(value, str):
        for number in (int, float):  # "1.5" for an integer option reads 1.5, as YAML reads it
            try:
                return number(value)
            except ValueError:
                pass
    return value


def _storage_options(value: Any) -> Any:
    """`--storage-option KEY=VALUE` flags, or in YAML one such string, a list of them or a mapping."""
    from pipeline.storage import parse_storage_options

    if isinstance(value, (str, list)):
        return parse_storage_options([str(v) for v in ([value] if isinstance(value, str) else value)])
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return value  # JobConfig refuses it


def build_config(opts: dict) -> JobConfig:
    """The job's configs from `merge_options`' options; the configs check every value.

    A subcommand's own options (like embed's --dry-run) are popped from `opts` before this.
    """
    extra = sorted(set(opts) - set(OPTION_FIELDS) - {"storage_option"})
    if extra:
        raise TypeError(f"build_config got options that set no config field: {extra} (this is a bug)")
    given: dict[type, dict] = {cls: {} for cls in CONFIGS}
    for dest, value in opts.items():
        if dest != "storage_option":
            cls, f = OPTION_FIELDS[dest]
            given[cls][f.name] = read_text(value, field_types(cls)[f.name])
    storage = {"storage_options": _storage_options(opts["storage_option"])} if "storage_option" in opts else {}
    return JobConfig(
        source=SourceConfig(**given[SourceConfig]),
        encode=EncodeConfig(**given[EncodeConfig]),
        sink=SinkConfig(**given[SinkConfig]),
        chunking=ChunkingConfig(**given[ChunkingConfig]),
        **storage,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    opts = merge_options(args)
    dry_run = opts.pop("dry_run", False)
    tokens_per_second = read_text(opts.pop("tokens_per_second", None), float | None)
    check_value("--dry-run", dry_run, bool)
    cfg = build_config(opts)
    if dry_run:
        from pipeline.plan import format_plan, plan_job

        plan = plan_job(cfg, tokens_per_second=tokens_per_second)
        print(format_plan(plan))
        return 2 if plan["problems"] else 0
    from pipeline.report import format_report
    from pipeline.run import run_job

    report = run_job(cfg)
    print(format_report(report))
    return 0  # rejected rows are recorded in the report, not failures


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.query import search
    from pipeline.storage import parse_storage_options

    options = parse_storage_options(args.storage_option or [])
    image = None
    if args.image is not None:  # read and checked as the pipeline reads an image column's paths
        from pipeline.images import fetcher, image_bytes
        from pipeline.storage import StorageConfig

        image, problem = image_bytes(args.image, fetcher(StorageConfig.from_env(options)))
        if problem:
            raise ValueError(f"--image {args.image}: {problem}")
    hits = search(args.db, args.table, args.text, image=image, column=args.column, k=args.k, modality=args.modality,
                  storage_options=options)
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for rank, h in enumerate(hits, 1):
        text = "[image]" if h.get("modality") == "image" else " ".join(h["text"].split())
        print(f"{rank:>3}. {h['score']:.4f}  {h['id']} #{h['chunk']}  {text[:160]}")
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    opts = merge_options(args)
    delete_missing, full = bool(opts.pop("delete_missing", False)), bool(opts.pop("full", False))
    check_value("--delete-missing", delete_missing, bool)
    check_value("--full", full, bool)
    if delete_missing and full:
        raise ValueError("--full replaces the whole table (documents gone from the source go with it); drop --delete-missing")
    cfg = build_config(opts)
    from pipeline.report import format_report
    from pipeline.run import run_job

    report = run_job(cfg, mode="full" if full else "reembed", delete_missing=delete_missing)
    print(format_report(report))
    return 0


def _storage(args: argparse.Namespace) -> StorageConfig:
    """The object store options of a table command: the environment's, then its --storage-option flags."""
    from pipeline.storage import StorageConfig, parse_storage_options

    return StorageConfig.from_env(parse_storage_options(args.storage_option or []))


def cmd_history(args: argparse.Namespace) -> int:
    from jobs.eval import format_table
    from pipeline.history import run_history

    runs = run_history(args.db, args.table, _storage(args))
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2))
        return 0
    rows = [{"run": r.run_id, "kind": r.kind if r.restored is None else f"rollback to {r.restored}",
             "state": r.state + (" (partial)" if r.partial else ""), "versions": f"{r.first_version}-{r.last_version}",
             "started": f"{r.started:%Y-%m-%dT%H:%M:%SZ}", "ended": f"{r.ended:%Y-%m-%dT%H:%M:%SZ}", "rows": r.rows,
             "added": r.added, "changed": r.changed, "deleted": r.deleted,
             "tagged": r.tagged_version} for r in runs]
    print(format_table(rows, list(rows[0]) if rows else ["run"]))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline.history import rollback

    version = rollback(args.db, args.table, args.to, _storage(args))
    print(f"table {args.table} now reads as after {args.to} (version {version})")
    return 0


def _add_table_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand on one existing table: --db, --table and --storage-option."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--db", required=True, help="LanceDB URI")
    p.add_argument("--table", required=True, help="table name")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="object store option (repeatable)")
    p.set_defaults(func=func)
    return p


def cmd_backfill(args: argparse.Namespace) -> int:
    opts = merge_options(args)
    partitions = opts.pop("partitions", None)
    if not isinstance(partitions, str) or not partitions.strip():
        raise ValueError("--partitions is required: partition paths (dt=2026-11-01,...) or a filter over partition columns")
    cfg = build_config(opts)
    from pipeline.report import format_report
    from pipeline.run import run_job

    print(format_report(run_job(cfg, mode="backfill", partitions=partitions)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedlake", description="Batch embedding: Parquet corpora -> LanceDB tables on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed", help="embed a Parquet corpus into a LanceDB table")
    add_embed_arguments(embed)
    embed.set_defaults(func=cmd_embed)
    reembed = sub.add_parser("reembed", help="update a table from its source: embed only new and changed documents")
    add_reembed_arguments(reembed)
    reembed.set_defaults(func=cmd_reembed)
    backfill = sub.add_parser("backfill", help="(re)build the selected partitions of a Hive-partitioned corpus in a table")
    add_backfill_arguments(backfill)
    backfill.set_defaults(func=cmd_backfill)
    query = sub.add_parser("query", help="search a table written by `embed`")
    query.add_argument("--db", required=True, help="LanceDB URI")
    query.add_argument("--table", required=True, help="table name")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="query text (embedded with the table's query task and prompt)")
    what.add_argument("--image", metavar="PATH", help="query image: a path or fsspec URL of a PNG, JPEG or WebP file "
                                                     "(models that embed images: jina-v4)")
    query.add_argument("--column", help="vector column, e.g. vector_256, or multivector_128 to rank by late "
                                        "interaction (MaxSim) (default: the first dim)")
    query.add_argument("-k", type=int, default=10, help="hits to print (default: 10)")
    query.add_argument("--modality", help="only rows of this modality, text or image (tables with an --image-column)")
    query.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="object store option (repeatable)")
    query.add_argument("--json", action="store_true", help="print hits as JSON")
    query.set_defaults(func=cmd_query)
    history = _add_table_command(sub, "history", "list the runs that wrote a table, oldest first", cmd_history)
    history.add_argument("--json", action="store_true", help="print the runs as JSON")
    rollback = _add_table_command(sub, "rollback", "make a table read as it did after a version or a run (one new commit)",
                                  cmd_rollback)
    rollback.add_argument("--to", required=True, metavar="VERSION|RUN_ID",
                          help="a table version, or a run id (its tagged final version); a known run id wins")
    from jobs.bench import register_bench

    register_bench(sub)
    from jobs.eval import register_eval

    register_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # user errors: say what, no traceback
        print(f"embedlake: error: {user_message(err)}", file=sys.stderr)
        return 2


def user_message(err: BaseException) -> str:
    """A user error's one line, also when a Ray task raised it.

    Ray re-raises a task's exception on the driver as `RayTaskError(<its type>)`, an instance of both, whose
    str() is the worker's traceback; `.cause` is the exception the task raised. Ray Data appends a retry
    hint to that one's message on a new line, so the first line is the task's own message.
    """
    if "ray" in sys.modules:  # no job ran without importing it
        from ray.exceptions import RayTaskError

        while isinstance(err, RayTaskError) and err.cause is not None:
            err = err.cause
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
