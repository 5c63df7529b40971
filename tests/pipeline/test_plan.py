"""The --dry-run estimate: on a corpus it samples whole, it equals what the prepare stage produces."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir, qmsum_transcripts, sts_sentences

from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.plan import SAMPLE_DOCS, plan_job
from pipeline.prepare import PrepareSpec, prepare_batch

MODES = {
    "none": ChunkingConfig(mode="none", max_length=64),  # the long document is truncated at the window
    "naive": ChunkingConfig(mode="fixed", chunk_tokens=16, late=False, max_length=64),
    "late": ChunkingConfig(mode="sentences", chunk_sentences=2, late=True, max_length=64),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, pa.Table]:
    """Two Parquet files, one long document and one bad row among short ones."""
    sents = sts_sentences(20)
    texts = [" ".join(sents[i : i + 4]) for i in range(0, 20, 4)] + [qmsum_transcripts(limit=1)[0][:2000], " "]
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    root = tmp_path_factory.mktemp("plan_corpus")
    pq.write_table(table.slice(0, 3), root / "part-0.parquet")
    pq.write_table(table.slice(3), root / "part-1.parquet")
    assert table.num_rows < SAMPLE_DOCS  # sampled whole: the estimate is exact
    return str(root), table


@pytest.mark.parametrize("mode", MODES)
def test_plan_estimate_equals_the_prepare_stages_output(corpus, mode):
    root, table = corpus
    cfg = JobConfig(source=SourceConfig(input=root), encode=EncodeConfig(model=str(minilm_dir())),
                    sink=SinkConfig(db="unused", table="t"), chunking=MODES[mode])
    plan = plan_job(cfg)
    spec = PrepareSpec(source=cfg.source, chunking=cfg.chunking, model=cfg.encode.model, task=plan["task"],
                       window=plan["window"])
    units = prepare_batch(table, spec)
    tokens = pc.sum(pc.list_value_length(units["_ids"])).as_py()
    chunks = pc.sum(pc.list_value_length(units["_char_spans"])).as_py() // 2
    assert plan["window"] == 64
    assert plan["documents"] == table.num_rows and plan["sampled_documents"] == table.num_rows - 1  # one bad row
    assert plan["estimated_tokens"] == tokens
    assert plan["estimated_chunks"] == chunks
    assert (chunks > table.num_rows - 1) == (mode != "none")

