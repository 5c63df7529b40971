"""`ray job submit` for real: a local Ray head with token auth, its Jobs API, infra/ray/runtime_env.yaml (issue #14).

The head is started the way a cluster's head is (`ray start --head --block`), on 127.0.0.1 with private ports
and its own temp dir, in its own process group, and that group is killed when the module ends, pass or fail
(never `ray stop`: it stops every Ray on the machine): tests/ray_head.py. Jobs go through `JobSubmissionClient`, the API that
`ray job submit` and infra/ray/submit.sh use, with the runtime env of infra/ray/runtime_env.yaml: the code
travels as the uploaded working_dir, as on a real cluster.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from infra_files import ROOT, RUNTIME_ENV, documents
from ray_head import LocalHead, api_status, local_head
from shared_data import minilm_dir, sts_sentences

pytestmark = pytest.mark.slow

JOB_S = 120


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalHead]:
    with local_head() as head:
        yield head


@pytest.fixture(scope="module")
def client(ray_head: LocalHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head.address, headers=ray_head.headers)


def runtime_env(tmp_path: Path) -> dict:
    """infra/ray/runtime_env.yaml as `ray job submit` reads it from the repo root; only the model cache moves
    from the image's /home/ray to a temp dir of this test."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["working_dir"] = str(ROOT / env["working_dir"])
    env["env_vars"]["EMBEDLAKE_CACHE"] = str(tmp_path / "cache")
    return env


def wait_for(client, submission_id: str) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_S
    while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                   JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"{submission_id} still {status} after {JOB_S} s"
        time.sleep(1)
    return str(status), client.get_job_logs(submission_id)


def test_the_jobs_api_needs_the_token(ray_head: LocalHead):
    assert api_status(ray_head, "/api/jobs/", auth=False) == 401
    assert api_status(ray_head, "/api/jobs/", auth=True) == 200


def test_submitted_embed_job_writes_the_table_and_a_second_submission_id_is_refused(client, tmp_path):
    import lancedb

    corpus, db = tmp_path / "corpus", tmp_path / "db"
    corpus.mkdir()
    sentences = sts_sentences(40)
    for k in range(2):
        part = sentences[k * 20:(k + 1) * 20]
        pq.write_table(pa.table({"id": [f"s{k}-{i}" for i in range(20)], "text": part}), corpus / f"part-{k}.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(corpus), "output": str(db), "table": "docs", "model": str(minilm_dir()),
                                   "dims": [384, 64], "actors": 1}))
    submission_id = f"embed-docs-{uuid.uuid4().hex[:8]}"
    request = {"entrypoint": f"python -m jobs.embed --config {job}", "submission_id": submission_id,
               "runtime_env": runtime_env(tmp_path), "metadata": {"corpus": "docs"}}

    assert client.submit_job(**request) == submission_id
    status, logs = wait_for(client, submission_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "chunks written 40" in logs, logs[-4000:]
    table = lancedb.connect(str(db)).open_table("docs")
    assert table.count_rows() == 40
    assert {"vector_384", "vector_64"} <= set(table.schema.names)
    (report,) = [json.loads(p.read_text()) for p in (db / "docs.reports").glob("*.json")]
    assert report["chunks_written"] == 40 and report["documents_read"] == 40

    # The same submission id again (a retried or re-scheduled submit) is refused and runs nothing.
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(**request)
    assert [j.submission_id for j in client.list_jobs()].count(submission_id) == 1


def test_a_job_with_a_bad_input_fails_with_one_clear_line_and_leaves_no_table(client, tmp_path):
    db = tmp_path / "db"
    missing = tmp_path / "no-such-corpus"
    submission_id = client.submit_job(
        entrypoint=f"python -m jobs.embed --input {missing} --output {db} --table docs --model {minilm_dir()}",
        runtime_env=runtime_env(tmp_path))
    status, logs = wait_for(client, submission_id)
    assert status == "FAILED", logs[-4000:]
    errors = [line for line in logs.splitlines() if line.startswith("embedlake: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert not db.exists() or not any(db.iterdir()), sorted(db.rglob("*"))


def scheduled_reembed() -> tuple[list[str], dict[str, str]]:
    """The nightly re-embed exactly as kuberay/cronjob-reembed.yaml schedules it: the RayJob template's
    entrypoint (argv) and the env vars of its runtimeEnvYAML."""
    (template,) = [d.body for d in documents() if d.carrier == "ConfigMap" and d.kind == "RayJob"]
    env = yaml.safe_load(template["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    return shlex.split(template["spec"]["entrypoint"]), env


def with_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """argv with the values of the flags in `values` replaced; each flag must be there, once."""
    out = list(argv)
    for flag, value in values.items():
        assert out.count(flag) == 1, f"{flag} appears {out.count(flag)} times in {argv}"
        out[out.index(flag) + 1] = value
    return out


def test_the_scheduled_reembed_command_on_an_unchanged_corpus_embeds_nothing(client, tmp_path):
    """The CronJob's own command, with only where-to-read, where-to-write and the model's location changed
    (the template's are an S3 bucket and a path inside the image). Everything else is verbatim: the task, the
    Matryoshka dims 1024,256,64, sentence chunking with late chunking, --delete-missing, --index. The model
    is a tiny random jina-v3 of hidden size 1024, so those dims and that task exist as in the real one."""
    import lancedb
    from tiny_jina import make_tiny_jina

    argv, env_vars = scheduled_reembed()
    assert argv[:3] == ["python", "-m", "jobs.reembed"] and "--delete-missing" in argv, argv
    corpus, db = tmp_path / "corpus", tmp_path / "db"
    corpus.mkdir()
    texts = [" ".join(sts_sentences(60)[i:i + 3]) for i in range(0, 60, 3)]  # 20 documents of 3 sentences
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(20)], "text": texts}), corpus / "part-0.parquet")
    model = make_tiny_jina(tmp_path / "jina-embeddings-v3", hidden=1024, layers=1, heads=16, intermediate=64)
    scheduled = with_values(argv, {"--input": str(corpus), "--output": str(db), "--model": str(model)})
    env = runtime_env(tmp_path)
    env["env_vars"] = {**env["env_vars"], **env_vars}

    # The table the schedule keeps up to date: made once by `embed` with the same settings.
    first = ["python", "-m", "jobs.embed", *(a for a in scheduled[3:] if a != "--delete-missing")]
    status, logs = wait_for(client, client.submit_job(entrypoint=shlex.join(first), runtime_env=env))
    assert status == "SUCCEEDED", logs[-4000:]
    table = lancedb.connect(str(db)).open_table("docs")
    rows, version = table.count_rows(), table.version
    assert {"vector_1024", "vector_256", "vector_64"} <= set(table.schema.names)

    submission_id = f"reembed-docs-{uuid.uuid4().hex[:8]}"
    status, logs = wait_for(client, client.submit_job(entrypoint=shlex.join(scheduled), runtime_env=env,
                                                      submission_id=submission_id))
    assert status == "SUCCEEDED", logs[-4000:]
    (report,) = [r for p in (db / "docs.reports").glob("*.json") if (r := json.loads(p.read_text()))["kind"] == "reembed"]
    assert report["documents_unchanged"] == 20, report
    assert report["documents_embedded"] == report["chunks_written"] == report["tokens"] == 0, report
    assert report["documents_deleted"] == report["documents_rejected"] == 0, report
    table = lancedb.connect(str(db)).open_table("docs")
    assert table.count_rows() == rows
    assert table.version > version  # the run's metadata commit: the table says when it was last checked
