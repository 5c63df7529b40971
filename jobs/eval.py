"""`embedlake eval`: retrieval quality of a written table, STS of a model, the QMSum late-chunking study.

  embedlake eval retrieval --db ./lancedb --table scifact --queries queries.jsonl --qrels test.tsv \\
      [--column vector_256] [--k-search 100] [--json [out.json]]
  embedlake eval sts --model <dir> [--data sts-test.csv] [--task text-matching] [--json [out.json]]
  embedlake eval qmsum --model <dir> [--data test.jsonl] [--limit 3] [--chunk-turns N | --chunk-tokens N] \\
      [--long-late 256:128 ...] [--json [out.json]]

Build a BEIR table first: `corpus_to_parquet` (pipeline.eval.retrieval) writes corpus.jsonl as Parquet, then
`embedlake embed --input corpus.parquet --title-column title ...`. `--json` alone prints JSON instead
of the table; `--json PATH` writes it to PATH as well.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import PRECISIONS


def shared_data() -> Path:
    """The shared data sets beside the checkout (EMBEDLAKE_SHARED_DATA overrides); read when a command runs."""
    return Path(os.environ.get("EMBEDLAKE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as an aligned text table; floats with 4 decimals, None as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _emit(result: dict, text: str, json_path: str | None) -> None:
    if json_path is None:
        print(text)
        return
    if json_path == "-":
        print(json.dumps(result, indent=2))
        return
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"results written to {json_path}")


def _long_late(value: str) -> tuple[int, int]:
    try:
        window, overlap = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WINDOW:OVERLAP in tokens, e.g. 256:128; got {value!r}") from None
    return window, overlap


def cmd_retrieval(args: argparse.Namespace) -> int:
    from pipeline.eval.retrieval import RETRIEVAL_METRICS, evaluate_retrieval, load_qrels, load_queries
    from pipeline.storage import parse_storage_options

    result = evaluate_retrieval(args.db, args.table, load_queries(args.queries), load_qrels(args.qrels),
                                column=args.column, k_search=args.k_search,
                                storage_options=parse_storage_options(args.storage_option or []))
    head = (f"table {result['table']}  column {result['column']}  model {result['model']}  "
            f"query task {result['query_task'] or '-'}\nqueries scored {result['queries']}  skipped {result['skipped']}"
            f" (no relevant document)")
    metrics = [f"{name}@{k}" for name, k in RETRIEVAL_METRICS]
    _emit(result, f"{head}\n{format_table([result], metrics)}", args.json)
    return 0


def cmd_sts(args: argparse.Namespace) -> int:
    from pipeline.eval.retrieval import evaluate_sts
    from pipeline.storage import parse_storage_options

    data = args.data or str(shared_data() / "stsbenchmark" / "sts-test.csv")
    result = evaluate_sts(args.model, data, task=args.task, precision=args.precision,
                          storage_options=parse_storage_options(args.storage_option or []))
    head = f"STS {result['data']}  model {result['model']}  task {result['task'] or '-'}  dtype {result['dtype']}"
    _emit(result, f"{head}\n{format_table([result], ['pairs', 'spearman', 'pearson'])}", args.json)
    return 0


def cmd_qmsum(args: argparse.Namespace) -> int:
    from model import load_encoder
    from pipeline.eval.qmsum import StudyConfig, run_study
    from pipeline.storage import StorageConfig

    cfg = StudyConfig(
        data=args.data or str(shared_data() / "qmsum" / "test.jsonl"),
        limit=args.limit or None,
        chunk_turns=args.chunk_turns,
        chunk_tokens=None if args.chunk_turns else args.chunk_tokens or StudyConfig.chunk_tokens,
        long_late=tuple(args.long_late) if args.long_late else StudyConfig.long_late,
    )
    cfg.validate()
    encoder = load_encoder(args.model, dtype=args.precision, storage_options=StorageConfig.from_env().fsspec_options(args.model))
    result = run_study(encoder, cfg)
    head = (
        f"QMSum {result['data']}  model {result['model']}\n"
        f"meetings {result['meetings']}  queries {result['queries']}  chunks {result['chunks']} ({result['chunking']})"
        f"  relevant chunks/query {result['relevant_chunks_per_query']}\n"
        f"transcript tokens mean {result['transcript_tokens']['mean']} max {result['transcript_tokens']['max']};"
        f" {result['transcripts_over_window']} of {result['meetings']} exceed the {result['model_max_length']}-token"
        f" window, so 'late' is long late chunking; naive chunks truncated {result['naive_chunks_truncated']}"
    )
    columns = ["method", "window", "overlap", "ndcg@10", "recall@10", "mrr@10", "seconds"]
    rows = [{**row, "seconds": f"{row['seconds']:.1f}"} for row in result["methods"]]
    _emit(result, f"{head}\n{format_table(rows, columns)}", args.json)
    return 0


def register_eval(subparsers) -> None:
    """Add `eval retrieval|sts|qmsum` to the `embedlake` subcommands."""
    p = subparsers.add_parser("eval", help="evaluate: retrieval over a table (BEIR files), STS, QMSum late chunking")
    sub = p.add_subparsers(dest="eval_command", required=True)
    json_help = "print results as JSON; with a PATH, write them there and print the table"
    precision_arg = dict(choices=PRECISIONS, default="auto",
                         help="compute precision (default: auto = bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32)")

    r = sub.add_parser("retrieval", help="nDCG@10, recall@100, MRR@10 of a table written by `embed`")
    r.add_argument("--db", required=True, help="LanceDB URI")
    r.add_argument("--table", required=True, help="table name")
    r.add_argument("--queries", required=True, help="BEIR queries.jsonl ({\"_id\", \"text\"} per line)")
    r.add_argument("--qrels", required=True, help="BEIR qrels TSV: query-id, corpus-id, score (header optional)")
    r.add_argument("--column", help="vector column, e.g. vector_256 (default: the first dim)")
    r.add_argument("--k-search", type=int, default=100, help="documents retrieved per query (default: 100)")
    r.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="object store option (repeatable)")
    r.add_argument("--json", nargs="?", const="-", metavar="PATH", help=json_help)
    r.set_defaults(func=cmd_retrieval)

    s = sub.add_parser("sts", help="Spearman of cosine similarity vs gold scores (STS Benchmark format)")
    s.add_argument("--model", required=True, help="model directory, fsspec URL or Hugging Face hub id")
    s.add_argument("--data", help="STS Benchmark file (default: the shared sts-test.csv)")
    s.add_argument("--task", help="task adapter (default: text-matching when the model has it, else none)")
    s.add_argument("--precision", **precision_arg)
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="object store option for an s3:// model")
    s.add_argument("--json", nargs="?", const="-", metavar="PATH", help=json_help)
    s.set_defaults(func=cmd_sts)

    q = sub.add_parser("qmsum", help="chunk-level retrieval on QMSum: naive vs late vs long late chunking")
    q.add_argument("--model", required=True, help="model directory, fsspec URL or Hugging Face hub id")
    q.add_argument("--precision", **precision_arg)
    q.add_argument("--data", help="QMSum jsonl split (default: the shared qmsum/test.jsonl)")
    q.add_argument("--limit", type=int, default=3, help="meetings to load, in file order; 0 loads all (default: 3)")
    size = q.add_mutually_exclusive_group()
    size.add_argument("--chunk-turns", type=int, help="chunks of N meeting turns")
    size.add_argument("--chunk-tokens", type=int, help="chunks of N tokens (default: 128)")
    q.add_argument("--long-late", type=_long_late, action="append", metavar="WINDOW:OVERLAP",
                   help="explicit long late chunking setting (repeatable; default: 256:128 and 128:32)")
    q.add_argument("--json", nargs="?", const="-", metavar="PATH", help=json_help)
    q.set_defaults(func=cmd_qmsum)
