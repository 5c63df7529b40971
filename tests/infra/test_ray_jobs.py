"""`ray job submit` for real: a local Ray head with token auth, its Jobs API, infra/ray/runtime_env.yaml (issue #14).

The head is started the way a cluster's head is (`ray start --head --block`), on 127.0.0.1 with private ports
and its own temp dir, in its own process group, and that group is killed when the module ends, pass or fail
(never `ray stop`: it stops every Ray on the machine). Jobs go through `JobSubmissionClient`, the API that
`ray job submit` and infra/ray/submit.sh use, with the runtime env of infra/ray/runtime_env.yaml: the code
travels as the uploaded working_dir, as on a real cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from infra_files import ROOT, RUNTIME_ENV, documents
from shared_data import minilm_dir, sts_sentences

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"  # never anything else: the head must not be reachable from outside this machine
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--node-manager-port", "--object-manager-port")
HEAD_START_S = 60
JOB_S = 120


@dataclass(frozen=True)
class LocalHead:
    address: str  # the Jobs API, http://127.0.0.1:PORT
    token: str
    temp_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _api_status(head: LocalHead, path: str, *, auth: bool) -> int:
    request = urllib.request.Request(head.address + path, headers=head.headers if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _stop(process: subprocess.Popen) -> None:
    """Kill the head's process group (every Ray process it started): SIGTERM, then SIGKILL after a grace
    period (`ray start --block` takes over 15 s to stop its processes on SIGTERM alone)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the group leader: its zombie would keep the group alive
            if not _group_alive(process.pid):
                return
            time.sleep(0.2)
    process.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalHead]:
    pytest.importorskip("aiohttp_cors", reason="the Jobs API runs in the dashboard: needs ray[default]")
    # Short: Ray's unix socket paths under the temp dir must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="el-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    # The job's `python` is this interpreter; PYTHONPATH is dropped so the job runs the uploaded working_dir.
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", HOST,
            "--dashboard-host", HOST, "--include-dashboard", "true", "--temp-dir", str(temp_dir),
            "--num-cpus", "2", "--disable-usage-stats", *(a for flag, port in ports.items() for a in (flag, str(port)))]
    log = temp_dir / "head.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(f"http://{HOST}:{ports['--dashboard-port']}", token, temp_dir)
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if _api_status(head, "/api/version", auth=True) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Jobs API did not come up in {HEAD_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield head
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    assert _api_status(ray_head, "/api/jobs/", auth=False) == 401
    assert _api_status(ray_head, "/api/jobs/", auth=True) == 200


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
