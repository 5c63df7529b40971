"""jina-embeddings-v4 through the pipeline (issue #15): a Parquet corpus of text, image, and text+image rows ->
single vectors at every dim, the multivector column, `modality` rows -> LanceDB, locally and on moto's S3.

Real everything: a tiny random v4 checkpoint in the published layout, a local Ray, LanceDB, moto. The table's
vectors are checked against the encoder called directly, and queries against MaxSim computed here.
"""

from __future__ import annotations

import io
import uuid

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shared_data import sts_sentences

from model import load_encoder
from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.query import maxsim, search
from pipeline.run import run_job
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig

DIMS = (64, 16)
ATOL = 1e-4  # float32 end to end; the table stores float32


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (112, 84)) -> bytes:
    """A smooth image with noise; sides multiples of 28 inside the pixel bounds (no resize)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * (seed + 1), y / h, (x * y) / (w * h)], axis=-1) * 120 + rng.integers(0, 60, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(out, format=fmt)
    return out.getvalue()


def corpus() -> pa.Table:
    sents = sts_sentences(20)
    rows = [  # id, text, image
        *[(f"text-{i}", " ".join(sents[3 * i: 3 * i + 3]), None) for i in range(4)],
        *[(f"image-{i}", None, image_bytes(i, fmt)) for i, fmt in enumerate(("PNG", "JPEG", "WEBP", "PNG"))],
        ("both-0", " ".join(sents[12:14]), image_bytes(10)),
        ("both-1", sents[15], image_bytes(11, "JPEG")),
        ("bad-image", sents[16], b"\x89PNG\r\n\x1a\n-truncated"),
        ("nothing", None, None),
    ]
    ids, texts, images = zip(*rows, strict=True)
    return pa.table({"id": list(ids), "text": pa.array(texts, pa.string()), "image": pa.array(images, pa.binary())})


@pytest.fixture(scope="module")
def v4(tiny_jina_v4_dir):
    return load_encoder(str(tiny_jina_v4_dir), device="cpu", dtype=torch.float32)


def job(src: str, db: str, model: str, *, index: bool = False) -> JobConfig:
    return JobConfig(
        source=SourceConfig(input=src, image_column="image"),
        encode=EncodeConfig(model=model, task="retrieval", prompt="passage", dims=DIMS, multi_vector=True, actors=1,
                            precision="float32"),
        chunking=ChunkingConfig(mode="sentences", chunk_sentences=1, late=True),
        sink=SinkConfig(db=db, table="mixed", index=index),
    )


@pytest.fixture(scope="module")
def local_job(ray_up, tmp_path_factory, tiny_jina_v4_dir):
    root = tmp_path_factory.mktemp("v4_job")
    (root / "in").mkdir()
    table = corpus()
    pq.write_table(table.slice(0, 7), root / "in" / "part-0.parquet")
    pq.write_table(table.slice(7), root / "in" / "part-1.parquet")
    cfg = job(str(root / "in"), str(root / "db"), str(tiny_jina_v4_dir), index=True)
    report = run_job(cfg)
    rows = lancedb.connect(cfg.sink.db).open_table("mixed").to_arrow().sort_by([("id", "ascending"), ("chunk", "ascending")])
    return cfg, report, table, rows


def check_vectors(rows: pa.Table, source: pa.Table, v4) -> None:
    """Every row's vectors equal the encoder's own output for its chunk or image (late chunking: spans of the
    whole text; multi-vectors: the whole text's token vectors, tiled by its chunks)."""
    by_id = {r["id"]: r for r in source.to_pylist()}
    for doc_id in sorted(set(rows["id"].to_pylist())):
        doc = rows.filter(pa.compute.equal(rows["id"], doc_id)).to_pylist()
        texts = [r for r in doc if r["modality"] == "text"]
        images = [r for r in doc if r["modality"] == "image"]
        src = by_id[doc_id]
        assert len(images) == (src["image"] is not None) and [r["chunk"] for r in doc] == list(range(len(doc)))
        if texts:
            spans = [(r["start"], r["end"]) for r in texts]
            assert [src["text"][s:e] for s, e in spans] == [r["text"] for r in texts]
            for d in DIMS:
                want = v4.encode_spans([src["text"]], [spans], task="retrieval", prompt="passage", dim=d)[0]
                np.testing.assert_allclose(np.stack([r[f"vector_{d}"] for r in texts]), want, atol=ATOL)
            tokens = np.concatenate([np.asarray(r["multivector_128"]) for r in texts])
            want = v4.encode_multi([src["text"]], task="retrieval", prompt="passage")[0]
            np.testing.assert_allclose(tokens, want, atol=ATOL)
        for r in images:
            assert (r["text"], r["start"], r["end"], r["chunk"]) == ("", 0, 0, len(texts))
            for d in DIMS:
                np.testing.assert_allclose(r[f"vector_{d}"], v4.encode_images([src["image"]], task="retrieval", dim=d)[0],
                                           atol=ATOL)
            np.testing.assert_allclose(np.asarray(r["multivector_128"]),
                                       v4.encode_multi([src["image"]], task="retrieval")[0], atol=ATOL)


def test_the_table_has_the_documented_schema(local_job):
    cfg, _, _, _ = local_job
    schema = lancedb.connect(cfg.sink.db).open_table("mixed").schema
    assert schema.names == ["id", "chunk", "start", "end", "text", "vector_64", "vector_16", "multivector_128",
                            "modality", "content_hash", "model"]
    assert schema.field("vector_64").type == pa.list_(pa.float32(), 64)
    assert schema.field("multivector_128").type == pa.list_(pa.list_(pa.float32(), 128))
    meta = read_table_metadata(table_uri(cfg.sink.db, "mixed"), {})
    assert (meta.model_family, meta.task, meta.prompt, meta.query_task, meta.query_prompt) == (
        "jina-v4", "retrieval", "passage", "retrieval", "query")
    assert meta.multi_vector and meta.image_column == "image" and meta.dims == DIMS


def test_rows_are_text_chunks_and_images_and_counts_reconcile(local_job, v4):
    _, report, source, rows = local_job
    modality = dict(zip(*np.unique(rows["modality"].to_numpy(zero_copy_only=False), return_counts=True), strict=True))
    assert modality["image"] == 6  # four image documents, two documents with text and an image
    assert set(rows["id"].to_pylist()) == {*(f"text-{i}" for i in range(4)), *(f"image-{i}" for i in range(4)),
                                          "both-0", "both-1"}
    assert report["documents_read"] == 12 and report["documents_embedded"] == 10 and report["documents_rejected"] == 2
    assert report["rejected_by_reason"] == {"undecodable image: Truncated File Read": 1, "missing text and image": 1}
    assert report["chunks_written"] == rows.num_rows
    assert set(report["indexes"]) == {"vector_64", "vector_16", "multivector_128"}
    check_vectors(rows, source, v4)


def test_a_text_query_ranks_by_maxsim_across_text_and_image_rows(local_job, v4):
    cfg, _, source, rows = local_job
    query = "A man is playing a guitar."
    q = v4.encode_multi([query], task="retrieval", prompt="query")[0]
    true = sorted(((maxsim(q, np.asarray(r["multivector_128"])), r["id"], r["chunk"]) for r in rows.to_pylist()),
                  reverse=True)
    hits = search(cfg.sink.db, "mixed", query, column="multivector_128", k=3)
    assert [(h["id"], h["chunk"]) for h in hits] == [(i, c) for _, i, c in true[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], [s for s, _, _ in true[:3]], rtol=1e-3)

    # Text finds images: of the six image rows, the one whose tokens best answer the query's (by MaxSim computed
    # here from the encoder's own output, not from the table) is the top hit among images.
    images = [r for r in source.to_pylist() if r["image"] is not None and r["id"] != "bad-image"]
    scores = {r["id"]: maxsim(q, v4.encode_multi([r["image"]], task="retrieval")[0]) for r in images}
    hits = search(cfg.sink.db, "mixed", query, column="multivector_128", k=6, modality="image")
    assert [h["id"] for h in hits] == sorted(scores, key=lambda i: -scores[i])
    assert {h["modality"] for h in hits} == {"image"}
    with pytest.raises(ValueError, match="modality must be one of text, image"):
        search(cfg.sink.db, "mixed", query, modality="video")


def test_an_image_query_finds_its_image_by_maxsim_and_by_vector(local_job, v4):
    """The constructed case: a stored image as the query. Every one of its token vectors meets itself, so its
    MaxSim is its token count, the most any row can score; by single vector its cosine is 1."""
    cfg, _, source, _ = local_job
    image = source.filter(pa.compute.equal(source["id"], "image-2"))["image"][0].as_py()
    (top, *_) = search(cfg.sink.db, "mixed", image=image, column="multivector_128", k=3)
    tokens = len(v4.encode_multi([image], task="retrieval")[0])
    assert (top["id"], top["modality"]) == ("image-2", "image") and top["score"] == pytest.approx(tokens, rel=1e-3)
    (top, *_) = search(cfg.sink.db, "mixed", image=image, column="vector_16", k=3)
    assert (top["id"], top["modality"]) == ("image-2", "image") and top["score"] == pytest.approx(1.0, abs=1e-3)


def test_image_paths_on_s3_into_a_table_on_s3(s3_env, ray_up, tiny_jina_v4_dir, v4):
    """The image column holds s3:// URLs, read with the job's storage options; input and table on moto too."""
    storage = StorageConfig.from_env()
    prefix = f"v4job-{uuid.uuid4().hex[:8]}"
    fs = storage.fsspec_filesystem(s3_env.url(prefix))
    source = corpus().filter(pa.compute.is_valid(corpus()["image"]))
    urls = [s3_env.url(prefix, "images", f"{i}.img") for i in range(source.num_rows)]
    for url, data in zip(urls, source["image"].to_pylist(), strict=True):
        fs.pipe_file(url.removeprefix("s3://"), data)
    urls[-1] = s3_env.url(prefix, "images", "gone.png")  # the bad-image row now names a missing object
    table = source.set_column(2, "image", pa.array(urls, pa.string()))
    pq.write_table(table, f"{s3_env.url(prefix, 'in').removeprefix('s3://')}/part-0.parquet",
                   filesystem=storage.pyarrow_filesystem(s3_env.url(prefix)))
    db = s3_env.url(prefix, "db")
    report = run_job(job(s3_env.url(prefix, "in"), db, str(tiny_jina_v4_dir)))

    assert report["documents_embedded"] == 6 and report["documents_rejected"] == 1
    (reason,) = report["rejected_by_reason"]
    assert reason.startswith(f"unreadable image {urls[-1]}: FileNotFoundError")
    rows = lancedb.connect(db, storage_options=s3_env.storage_options).open_table("mixed").to_arrow()
    rows = rows.sort_by([("id", "ascending"), ("chunk", "ascending")])
    check_vectors(rows, source, v4)


def test_dry_run_estimates_the_multivector_storage_exactly_on_a_corpus_it_samples_whole(local_job):
    """128 x tokens x 4 bytes: the plan's token count is the prepare stage's (text and image tokens), and the
    sample here is the whole corpus, so it must equal what the job stored."""
    from pipeline.plan import format_plan, plan_job

    cfg, _, _, rows = local_job
    plan = plan_job(cfg)
    stored = int(pa.compute.sum(pa.compute.list_value_length(rows["multivector_128"])).as_py())
    assert plan["estimated_multivector_bytes"] == stored * 128 * 4
    assert plan["estimated_chunks"] == rows.num_rows
    assert plan["estimated_multivector_bytes"] > 10 * plan["estimated_vector_bytes"]
    assert "multivector_128 ~" in format_plan(plan) and "x the single vectors" in format_plan(plan)


def test_the_cli_embeds_and_queries_with_images(local_job, tiny_jina_v4_dir, tmp_path, capsys):
    """`embedlake embed` with the v4 flags, then `embedlake query --image` on the multivector column."""
    from jobs.cli import main

    cfg, _, source, _ = local_job
    db = str(tmp_path / "db")
    assert main(["embed", "--input", cfg.source.input, "--output", db, "--table", "cli", "--model",
                 str(tiny_jina_v4_dir), "--task", "code", "--prompt", "passage", "--dims", "32", "--image-column",
                 "image", "--multi-vector", "--chunking", "sentences", "--actors", "1", "--precision", "float32",
                 "--vector-dtype", "float16"]) == 0
    meta = read_table_metadata(table_uri(db, "cli"), {})
    assert (meta.task, meta.prompt, meta.multi_vector, meta.vector_columns()) == (
        "code", "passage", True, ["vector_32", "multivector_128"])
    assert (meta.query_task, meta.query_prompt) == ("code", "query")  # the documents' adapter, the query prompt
    schema = lancedb.connect(db).open_table("cli").schema
    assert schema.field("multivector_128").type == pa.list_(pa.list_(pa.float16(), 128))
    assert schema.field("vector_32").type == pa.list_(pa.float16(), 32)
    image = tmp_path / "q.png"
    image.write_bytes(source.filter(pa.compute.equal(source["id"], "image-0"))["image"][0].as_py())
    capsys.readouterr()
    assert main(["query", "--db", db, "--table", "cli", "--image", str(image), "--column", "multivector_128",
                 "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[2:] == ["image-0", "#0", "[image]"]
    assert main(["query", "--db", db, "--table", "cli", "--image", str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_options_a_model_cannot_serve_are_refused_before_the_job(tiny_jina_model, tmp_path):
    from pipeline.run import resolve

    def cfg(**encode) -> JobConfig:
        source = {"image_column": encode.pop("image_column")} if "image_column" in encode else {}
        return JobConfig(source=SourceConfig(input="unused", **source),
                         encode=EncodeConfig(model=str(tiny_jina_model), **encode),
                         sink=SinkConfig(db=str(tmp_path), table="t"))

    cluster = {"CPU": 2}
    with pytest.raises(ValueError, match="--prompt is for models with query/passage prompts"):
        resolve(cfg(prompt="passage"), cluster=cluster)
    with pytest.raises(ValueError, match="--multi-vector needs a model with 128-d per-token vectors"):
        resolve(cfg(multi_vector=True), cluster=cluster)
    with pytest.raises(ValueError, match="--image-column needs a model that embeds images"):
        resolve(cfg(image_column="image"), cluster=cluster)


def test_reembed_of_the_unchanged_corpus_embeds_nothing_and_a_changed_image_only_its_document(local_job, tmp_path):
    import shutil

    cfg, _, source, _ = local_job
    report = run_job(cfg, mode="reembed")
    assert report["documents_unchanged"] == 10 and report["documents_embedded"] == report["chunks_written"] == 0
    changed = tmp_path / "in"
    shutil.copytree(cfg.source.input, changed)
    part = pq.read_table(changed / "part-1.parquet")
    images = part["image"].to_pylist()
    images[part["id"].to_pylist().index("both-0")] = image_bytes(99)
    pq.write_table(part.set_column(2, "image", pa.array(images, pa.binary())), changed / "part-1.parquet")
    import dataclasses

    report = run_job(dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, input=str(changed))),
                     mode="reembed")
    assert (report["documents_changed"], report["documents_unchanged"]) == (1, 9)
    rows = lancedb.connect(cfg.sink.db).open_table("mixed").to_arrow()
    both = rows.filter(pa.compute.equal(rows["id"], "both-0")).sort_by("chunk").to_pylist()
    assert [r["modality"] for r in both] == ["text", "text", "image"]  # replaced whole, not doubled
