"""The config dataclasses check every value on construction, with the message the command line gives.

tests/jobs/test_cli.py sends the same bad values through flags and YAML; here they come from Python.
"""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EncodeConfig(model="m", max_batch_tokens=0), "--max-batch-tokens must be >= 1, got 0"),
        (lambda: EncodeConfig(model="m", vector_dtype="float64"),
         "--vector-dtype must be one of float32, float16; got 'float64'"),
        (lambda: EncodeConfig(model="m", precision="fp16"), "--precision must be one of auto, float32, bfloat16; got 'fp16'"),
        (lambda: EncodeConfig(model="m", actors=0), "--actors must be >= 1, got 0"),
        (lambda: EncodeConfig(model="m", actors=True), "--actors must be N, MIN..MAX or MIN.. (integers), got 'True'"),
        (lambda: EncodeConfig(model="m", actors="3..2"), "--actors MIN..MAX needs MIN <= MAX, got 3..2"),
        (lambda: EncodeConfig(model="m", actors="0..2"), "--actors must be >= 1, got 0"),
        (lambda: EncodeConfig(model="m", device="tpu"), "--device must be one of auto, gpu, cpu; got 'tpu'"),
        (lambda: EncodeConfig(model="m", cpus_per_actor=float("nan")), "--cpus-per-actor must be > 0, got nan"),
        (lambda: EncodeConfig(model="m", dims=[256]), "--dims must be a tuple, got [256]"),
        (lambda: EncodeConfig(model="m", dims=(256, 0)), "--dims must be >= 1, got 0"),
        (lambda: EncodeConfig(model=None), "--model must be a string, got None"),
        (lambda: ChunkingConfig(mode="words"), "--chunking must be one of none, fixed, sentences; got 'words'"),
        (lambda: ChunkingConfig(late="yes"), "--late-chunking must be true or false, got 'yes'"),
        (lambda: ChunkingConfig(overlap=-1), "--overlap must be >= 0, got -1"),
        (lambda: ChunkingConfig(max_length=64, overlap=64), "--overlap must be < --max-length (64), got 64"),
        (lambda: SinkConfig(db="d", table="t", commit_every_s=0), "--commit-every-s must be > 0, got 0"),
        (lambda: SinkConfig(db=3, table="t"), "--output must be a string, got 3"),
        (lambda: SourceConfig(input="i", keep_columns=("a", 1)), "--keep-columns must be a string, got 1"),
    ],
)
def test_python_callers_get_the_command_line_message(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


def test_a_job_checks_its_parts():
    parts = {"source": SourceConfig(input="i"), "encode": EncodeConfig(model="m"), "sink": SinkConfig(db="d", table="t")}
    with pytest.raises(ValueError, match="--storage-option must be a mapping of strings to strings, got {'allow_http': True}"):
        JobConfig(**parts, storage_options={"allow_http": True})
    with pytest.raises(ValueError, match="chunking must be a ChunkingConfig, got 'fixed'"):
        JobConfig(**parts, chunking="fixed")
    job = JobConfig(**parts)
    with pytest.raises(ValueError, match="--sort-window must be >= 1, got 0"):  # replace() checks too
        dataclasses.replace(job.encode, sort_window=0)
    assert job.encode.max_batch_tokens is None and job.chunking.overlap is None  # decided later, never guessed here
