"""Pre-flight checks one by one (the CLI tests run them end to end): S3 output buckets, skip-aware input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir

from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.preflight import check_input, check_output, find_problems
from pipeline.storage import StorageConfig


def test_an_s3_output_needs_a_bucket_that_exists(moto_s3):
    storage = StorageConfig.from_env(moto_s3.storage_options, env={})
    check_output(SinkConfig(db=moto_s3.url("lancedb"), table="t"), storage)
    with pytest.raises(ValueError, match=r"^output s3://no-such-bucket/db: bucket 'no-such-bucket' does not exist or "
                                         r"does not answer; create it, or check --output"):
        check_output(SinkConfig(db="s3://no-such-bucket/db", table="t"), storage)


def test_a_local_output_below_a_file_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output(SinkConfig(db=str(tmp_path / "new" / "deeper"), table="t"), StorageConfig())
    with pytest.raises(ValueError, match=r"cannot be created: .*/f is a file; choose another --output"):
        check_output(SinkConfig(db=str(tmp_path / "f" / "db"), table="t"), StorageConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_skip_passes_over_a_bad_first_file_as_the_job_would(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["y"], "text": ["fine"], "n": [1]}), tmp_path / "c.parquet")
    source = SourceConfig(input=str(tmp_path), on_bad_file="skip")
    files, schema = check_input(source, StorageConfig())
    assert len(files) == 3 and schema.names == ["id", "text", "n"]
    with pytest.raises(ValueError, match=r"a\.parquet is not a readable Parquet file"):
        check_input(SourceConfig(input=str(tmp_path)), StorageConfig())
    (tmp_path / "c.parquet").unlink()
    with pytest.raises(ValueError, match=r"^no file of input .* is readable \(2 tried\); the first: input file "):
        check_input(source, StorageConfig())


def test_find_problems_lists_each_check_once_and_finds_nothing_on_a_good_job(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, 2]), "text": ["a", "b"]}), tmp_path / "p.parquet")
    good = JobConfig(source=SourceConfig(input=str(tmp_path)), encode=EncodeConfig(model=str(minilm_dir())),
                     sink=SinkConfig(db=str(tmp_path / "db"), table="t"))
    checked, problems = find_problems(good)
    assert problems == [] and checked is not None and checked.files == [str(tmp_path / "p.parquet")]
    bad = JobConfig(source=SourceConfig(input=str(tmp_path / "nowhere")),
                    encode=EncodeConfig(model=str(minilm_dir()), dims=(4096,)),
                    sink=SinkConfig(db=str(tmp_path / "p.parquet" / "db"), table="t"))
    checked, problems = find_problems(bad)
    assert checked is None and len(problems) == 3, problems
    assert problems[0].endswith("nowhere does not exist; check --input")
    assert "p.parquet is a file" in problems[1]
    assert problems[2].startswith("dim 4096 is not available from ")  # the dims check, made by resolve
