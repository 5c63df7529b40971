"""`embedlake` command line: parse flags (and an optional YAML config), build configs, call pipeline.

Launch the embed job:
  local:            embedlake embed --input data/ --output ./lancedb --table docs --model <dir>
  Ray job submit:   ray job submit --address http://head:8265 --working-dir . -- \\
                      python -m jobs.embed --input s3://bucket/corpus/ --output s3://bucket/lancedb \\
                      --table docs --model s3://bucket/models/jina-embeddings-v3 --dims 1024,256,64
  KubeRay:          see infra/kuberay/rayjob-embed.yaml (entrypoint `python -m jobs.embed ...`)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from pipeline.config import PRECISIONS

EMBED_DEFAULTS = {
    "id_column": "id",
    "text_column": "text",
    "title_column": None,
    "keep_columns": "",
    "task": None,
    "dims": "",
    "vector_dtype": "float32",
    "precision": "auto",
    "chunking": "none",
    "chunk_tokens": 256,
    "chunk_sentences": 5,
    "late_chunking": True,
    "max_length": None,
    "overlap": None,
    "mode": "create",
    "max_batch_tokens": None,
    "actors": None,
    "cpus_per_actor": 1.0,
    "sort_window": 4096,
    "index": False,
    "storage_option": [],
    "commit_every_rows": 100_000,
    "dry_run": False,
    "tokens_per_second": None,
}
REQUIRED = ("input", "output", "table", "model")


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are applied after merging the config file, so every flag defaults to None here.
    p.add_argument("--config", help="YAML file with any of these options (keys as flag names, '-' or '_'); flags override it")
    p.add_argument("--input", help="Parquet directory, glob or URL (local, s3://..., any fsspec URL)")
    p.add_argument("--output", help="LanceDB URI: local path or s3://bucket/prefix")
    p.add_argument("--table", help="table name in the LanceDB database")
    p.add_argument("--model", help="model directory, fsspec URL of one, or Hugging Face hub id (cached)")
    p.add_argument("--id-column", help="document id column (default: id)")
    p.add_argument("--text-column", help="text column (default: text)")
    p.add_argument("--title-column", help="optional title column; the embedded text is title + ' ' + text")
    p.add_argument("--keep-columns", help="comma-separated input columns to carry into the table")
    p.add_argument("--task", help="task adapter/instruction (default: retrieval.passage for jina-v3, none otherwise)")
    p.add_argument("--dims", help="comma-separated Matryoshka dims, one vector column each (default: the full dim)")
    p.add_argument("--vector-dtype", choices=["float32", "float16"], help="stored vector type (default: float32)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="compute precision (default: auto = bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32; "
                        "float32 gives reference-exact vectors)")
    p.add_argument("--chunking", choices=["none", "fixed", "sentences"], help="chunking (default: none)")
    p.add_argument("--chunk-tokens", type=int, help="tokens per chunk with --chunking fixed (default: 256)")
    p.add_argument("--chunk-sentences", type=int, help="sentences per chunk with --chunking sentences (default: 5)")
    p.add_argument("--late-chunking", dest="late_chunking", action="store_true", default=None,
                   help="pool chunks from whole-document token states (default when chunking)")
    p.add_argument("--no-late-chunking", dest="late_chunking", action="store_false",
                   help="encode each chunk on its own (naive chunking)")
    p.add_argument("--max-length", type=int, help="tokens per model window (default: the model maximum)")
    p.add_argument("--overlap", type=int, help="long late chunking window overlap in tokens (default: min(512, window/4))")
    p.add_argument("--mode", choices=["create", "append", "overwrite"], help="table write mode (default: create, fails if it exists)")
    p.add_argument("--max-batch-tokens", type=int, help="token budget per forward pass (default: 65536 on GPU, 16384 on CPU)")
    p.add_argument("--actors", type=int, help="encoder actors (default: one per GPU, or a CPU count on CPU-only clusters)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per encoder actor (default: 1)")
    p.add_argument("--sort-window", type=int, help="documents per encoder call, length-sorted inside (default: 4096)")
    p.add_argument("--index", action="store_true", default=None, help="build an ANN index on each vector column after the write")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="object store option for the reader and LanceDB (repeatable), e.g. endpoint=http://127.0.0.1:9000")
    p.add_argument("--commit-every-rows", type=int, help="rows per atomic commit window (default: 100000)")
    p.add_argument("--dry-run", action="store_true", default=None, help="print the plan and an estimate; start no encoders")
    p.add_argument("--tokens-per-second", type=float, help="per-actor throughput for the --dry-run estimate")


def merge_options(args: argparse.Namespace) -> dict:
    """Defaults <- config file <- flags given on the command line."""
    opts = dict(EMBED_DEFAULTS)
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.config}: expected a mapping of option names to values")
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in opts and name not in REQUIRED:
                raise SystemExit(f"{args.config}: unknown option {key!r}")
            opts[name] = value
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "command", "func"):
            opts[key] = value
    missing = [f"--{k}" for k in REQUIRED if not opts.get(k)]
    if missing:
        raise SystemExit(f"missing required options: {', '.join(missing)}")
    return opts


def _csv(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


def build_config(opts: dict):
    from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
    from pipeline.storage import parse_storage_options

    try:
        dims = tuple(int(d) for d in _csv(opts["dims"]))
    except ValueError as err:
        raise SystemExit(f"--dims must be comma-separated integers: {err}") from None
    storage = opts["storage_option"]
    storage = parse_storage_options(storage) if isinstance(storage, list) else {str(k): str(v) for k, v in storage.items()}
    return JobConfig(
        source=SourceConfig(
            input=str(opts["input"]),
            id_column=opts["id_column"],
            text_column=opts["text_column"],
            title_column=opts["title_column"],
            keep_columns=_csv(opts["keep_columns"]),
        ),
        encode=EncodeConfig(
            model=str(opts["model"]),
            task=opts["task"],
            dims=dims,
            vector_dtype=opts["vector_dtype"],
            precision=opts["precision"],
            max_batch_tokens=opts["max_batch_tokens"],
            actors=opts["actors"],
            cpus_per_actor=float(opts["cpus_per_actor"]),
            sort_window=int(opts["sort_window"]),
        ),
        sink=SinkConfig(
            db=str(opts["output"]),
            table=str(opts["table"]),
            mode=opts["mode"],
            index=bool(opts["index"]),
            commit_every_rows=int(opts["commit_every_rows"]),
        ),
        chunking=ChunkingConfig(
            mode=opts["chunking"],
            chunk_tokens=int(opts["chunk_tokens"]),
            chunk_sentences=int(opts["chunk_sentences"]),
            late=bool(opts["late_chunking"]),
            max_length=opts["max_length"],
            overlap=opts["overlap"],
        ),
        storage_options=storage,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    opts = merge_options(args)
    cfg = build_config(opts)
    if opts["dry_run"]:
        from pipeline.plan import format_plan, plan_job

        print(format_plan(plan_job(cfg, tokens_per_second=opts["tokens_per_second"])))
        return 0
    from pipeline.report import format_report
    from pipeline.run import run_job

    report = run_job(cfg)
    print(format_report(report))
    return 0  # rejected rows are recorded in the report, not failures


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.query import search
    from pipeline.storage import parse_storage_options

    hits = search(args.db, args.table, args.text, column=args.column, k=args.k,
                  storage_options=parse_storage_options(args.storage_option or []))
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for rank, h in enumerate(hits, 1):
        text = " ".join(h["text"].split())
        print(f"{rank:>3}. {h['score']:.4f}  {h['id']} #{h['chunk']}  {text[:160]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedlake", description="Batch embedding: Parquet corpora -> LanceDB tables on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed", help="embed a Parquet corpus into a LanceDB table")
    add_embed_arguments(embed)
    embed.set_defaults(func=cmd_embed)
    query = sub.add_parser("query", help="search a table written by `embed`")
    query.add_argument("--db", required=True, help="LanceDB URI")
    query.add_argument("--table", required=True, help="table name")
    query.add_argument("--text", required=True, help="query text (embedded with the table's query task)")
    query.add_argument("--column", help="vector column, e.g. vector_256 (default: the first dim)")
    query.add_argument("-k", type=int, default=10, help="hits to print (default: 10)")
    query.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="object store option (repeatable)")
    query.add_argument("--json", action="store_true", help="print hits as JSON")
    query.set_defaults(func=cmd_query)
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
        print(f"embedlake: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
