"""Shared fixtures: a local S3 (moto server on 127.0.0.1) and one local Ray cluster per session.

Real components, no mocks: moto's `ThreadedMotoServer` speaks the S3 protocol over HTTP, including
`If-None-Match` conditional PUTs that Lance commits rely on (spec §0.5, §8 E1).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The checkpoint builders (tiny_jina, tiny_st) live beside the model tests; pipeline and jobs tests
# build checkpoints with them too.
sys.path.insert(0, str(Path(__file__).resolve().parent / "model"))

MOTO_HOST = "127.0.0.1"  # never anything else: tests must not reach outside this machine
TEST_BUCKET = "embedlake-test"


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 endpoint and the settings that point clients at it."""

    endpoint_url: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)  # standard AWS_* variables

    @property
    def storage_options(self) -> dict[str, str]:
        """The same settings in Lance's option naming (spec §2.5)."""
        return {
            "endpoint": self.endpoint_url,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "region": "us-east-1",
            "allow_http": "true",
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """Start moto's S3 server on a free loopback port with one bucket; stop it at session end."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address=MOTO_HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == MOTO_HOST, host
        endpoint = f"http://{MOTO_HOST}:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=TEST_BUCKET)
        yield MotoS3(endpoint_url=endpoint, bucket=TEST_BUCKET, env=env)
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """Point this test's process environment (AWS_*) at the moto server; restored afterwards.

    Only this process sees it: Ray workers that are already running keep their environment, so code
    under test must pass storage options to workers explicitly (see `ray_local`).
    """
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    return moto_s3


def _init_ray(env_vars: dict[str, str]) -> None:
    import ray

    # runtime_env env_vars reach every worker Ray starts for this job, unlike os.environ changes made
    # on the driver after ray.init. num_cpus is logical: 4 slots let an actor pool and read tasks coexist
    # on a 2-core machine (spec §0.7).
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": env_vars},
    )


@pytest.fixture(scope="session")
def ray_local(moto_s3: MotoS3) -> Iterator[Any]:
    """A local Ray (4 logical CPUs) whose workers see the moto AWS_* settings; shut down at session end.

    Session-scoped; `_ray_reinit` below starts it again for a test that asks for it after another test
    module shut Ray down to run a differently shaped cluster.
    """
    import ray

    if not ray.is_initialized():
        _init_ray(moto_s3.env)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_reinit(request: pytest.FixtureRequest) -> None:
    # Runs after the session-scoped ray_local was set up (higher scopes first), so a cached ray_local
    # whose cluster was shut down in between is brought back before the test body.
    if "ray_local" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        _init_ray(request.getfixturevalue("moto_s3").env)


@pytest.fixture(scope="session")
def tiny_jina_v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random jina-embeddings-v4 checkpoint directory in the published layout (tiny_jina_v4.py), seed 0."""
    from tiny_jina_v4 import build

    return build(tmp_path_factory.mktemp("tiny_jina_v4") / "jina-embeddings-v4-tiny", seed=0)
