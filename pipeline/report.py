"""The run report: what was read, written, rejected, and how fast; printed and stored beside the table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pipeline.elastic import pool_timeline
from pipeline.storage import StorageConfig, url_path

if TYPE_CHECKING:
    from pipeline.commit import CommitSummary


def build_report(job: dict, summary: CommitSummary, *, wall_s: float, indexes: dict,
                 files_skipped: list[dict] | None = None) -> dict:
    """`job` is `pipeline.run.describe_job`'s plain facts; the counts come from the committed windows.
    `files_skipped`: the bad files `--on-bad-file skip` left out, [{"file", "reason"}].

    Documents read reconcile as embedded (new + changed) + unchanged + rejected.
    """
    s = summary.stats
    docs_ok = int(s.get("_docs", 0))
    tokens = int(s.get("_tokens", 0))
    computed = int(s.get("_computed_tokens", 0))
    embed_s = float(s.get("_embed_s", 0.0))
    rejected = sum(summary.rejected.values())
    unchanged = summary.documents.get("unchanged", 0)
    resume = summary.resume
    return {
        "run_id": job["run_id"],
        "kind": job["kind"],
        "input": job["input"],
        "output": {"db": job["db"], "table": job["table"], "mode": job["kind"], "version": summary.version},
        "model": job["model"],
        "task": job["task"],
        "dims": job["dims"],
        "chunking": job["chunking"],
        "resumed_from": {"version": resume.base_version, "rows": resume.rows_before, "staged": resume.staged}
        if resume.resumed else None,
        "documents_read": docs_ok + unchanged + rejected,
        "documents_embedded": docs_ok,
        "documents_new": summary.documents.get("new", 0),
        "documents_changed": summary.documents.get("changed", 0),
        "documents_unchanged": unchanged,
        "documents_rejected": rejected,
        "documents_deleted": summary.deleted_documents,
        "documents_missing_kept": summary.missing_kept,
        "documents_truncated": int(s.get("_truncated", 0)),
        "rejected_by_reason": dict(summary.rejected),
        "files_skipped_count": len(files_skipped or []),
        "files_skipped": list(files_skipped or []),
        "rejected_sample": summary.reject_sample,
        "rejected_table": f"{job['table']}_rejected",
        "chunks_written": summary.rows_committed,
        "chunks_replaced": summary.replaced_rows,
        "tokens": tokens,
        "computed_tokens": computed,
        "padding_efficiency": round(tokens / computed, 4) if computed else 1.0,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else 0.0,
        "encoder_tokens_per_s": round(tokens / embed_s, 1) if embed_s else 0.0,
        "wall_s": round(wall_s, 2),
        "stage_s": {  # summed task time per stage (stages overlap, so these exceed wall time together)
            "prepare": round(float(s.get("_prepare_s", 0.0)), 2),
            "embed": round(embed_s, 2),
        },
        "actors": summary.tallies.get("_actor", {}),
        # The pool over time (issue #17): bounds asked for, actors busy per interval, nodes that ran encoders.
        "encoder_pool": {"device": job["device"], "bounds": job["actor_bounds"],
                         **pool_timeline(summary.tallies.get("_actor_call", {}))},
        "commits": summary.commits,
        "fragments": summary.fragments_committed,
        "indexes": indexes,
    }


def report_url(db: str, table: str, run_id: str) -> str:
    return f"{db.rstrip('/')}/{table}.reports/{run_id}.json"


def save_report(report: dict, db: str, table: str, storage: StorageConfig) -> str:
    """Beside the table (never inside the Lance directory, whose cleanup owns every file there)."""
    url = report_url(db, table, report["run_id"])
    fs = storage.fsspec_filesystem(url)
    path = url_path(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    return url


def _format_pool(pool: dict) -> str:
    low, high = pool["bounds"]
    return (f"  encoder pool: {pool['device']} actors {low}..{high}, busy per {pool['interval_s']:.0f} s"
            f" min {pool['min']} max {pool['max']}, on {len(pool['nodes'])} node(s)")


def format_report(report: dict) -> str:
    lines = [
        f"run {report['run_id']}: {report['input']} -> {report['output']['db']} table {report['output']['table']}"
        f" (version {report['output']['version']})",
        f"  model {report['model']}  task {report['task']}  dims {report['dims']}  chunking {report['chunking']}",
        f"  documents read {report['documents_read']}  embedded {report['documents_embedded']}"
        f" (new {report['documents_new']}, changed {report['documents_changed']})"
        f"  unchanged {report['documents_unchanged']}  deleted {report['documents_deleted']}"
        f"  missing-but-kept {report['documents_missing_kept']}"
        f"  rejected {report['documents_rejected']} {report['rejected_by_reason'] or ''}"
        f"  truncated {report['documents_truncated']}",
        f"  chunks written {report['chunks_written']}  tokens {report['tokens']}"
        f"  padding efficiency {report['padding_efficiency']:.1%}",
        f"  wall {report['wall_s']} s  tokens/s {report['tokens_per_s']} (encoder {report['encoder_tokens_per_s']})"
        f"  stage seconds {report['stage_s']}",
        f"  actors {len(report['actors'])}  commits {report['commits']}  indexes {report['indexes'] or 'none'}",
        _format_pool(report["encoder_pool"]),
    ]
    if report.get("files_skipped"):
        lines.append(f"  files skipped {report['files_skipped_count']} (--on-bad-file skip):")
        lines += [f"    {f['file']}: {f['reason']}" for f in report["files_skipped"]]
    if report.get("resumed_from"):
        r = report["resumed_from"]
        lines.append(f"  resumed from version {r['version']} ({r['rows']} rows already committed{', staged' if r['staged'] else ''})")
    if report.get("report_path"):
        lines.append(f"  report {report['report_path']}")
    return "\n".join(lines)
