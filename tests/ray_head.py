"""A real Ray head for tests, started as a cluster's head is (`ray start --head --block`) and stopped by its process
group: tests/infra/test_ray_jobs.py (the Jobs API) and tests/pipeline/test_elastic_cluster.py (an autoscaling
cluster of fake GPU nodes) use it.

Everything listens on 127.0.0.1 with private ports, token auth and its own temp dir. The head runs in its own
process group, and so does every process it starts (the autoscaler's fake nodes included): `stop` kills that
group, never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"  # never anything else: the head must not be reachable from outside this machine
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--node-manager-port", "--object-manager-port")
HEAD_START_S = 60


@dataclass(frozen=True)
class LocalHead:
    address: str  # the Jobs API, http://127.0.0.1:PORT
    gcs_address: str  # 127.0.0.1:PORT, what RAY_ADDRESS names for a driver that joins the cluster
    token: str
    temp_dir: Path
    pgid: int  # the head's process group: every Ray process of this cluster

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self) -> dict[str, str]:
        """The variables a driver process needs to join this head (Ray reads them at import)."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                # A driver takes its machine's address, and Ray rewrites 127.0.0.1 to it, unless this is off.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def api_status(head: LocalHead, path: str, *, auth: bool) -> int:
    request = urllib.request.Request(head.address + path, headers=head.headers if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def stop(process: subprocess.Popen) -> None:
    """Kill a process group (a head: every Ray process it started): SIGTERM, then SIGKILL after a grace
    period (`ray start --block` takes over 15 s to stop its processes on SIGTERM alone)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the group leader: its zombie would keep the group alive
            if not group_alive(process.pid):
                return
            time.sleep(0.2)
    process.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def local_head(*, num_cpus: int = 2, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
               ports: dict[str, int] | None = None) -> Iterator[LocalHead]:
    """A running head with the dashboard (its Jobs API answers before this yields); stopped on exit.

    `env` is added to a clean environment (no RAY_*, no PYTHONPATH: a submitted job runs its uploaded
    working_dir); `ports` fixes some of PORT_FLAGS (the others are free ports).
    """
    pytest.importorskip("aiohttp_cors", reason="the Jobs API runs in the dashboard: needs ray[default]")
    # Short: Ray's unix socket paths under the temp dir must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="el-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    ports = {**dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True)), **(ports or {})}
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    # The job's `python` is this interpreter.
    base |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}", **(env or {})}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", HOST,
            "--dashboard-host", HOST, "--include-dashboard", "true", "--temp-dir", str(temp_dir),
            "--num-cpus", str(num_cpus), "--disable-usage-stats", *extra_args,
            *(a for flag, port in ports.items() for a in (flag, str(port)))]
    log = temp_dir / "head.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(f"http://{HOST}:{ports['--dashboard-port']}", f"{HOST}:{ports['--port']}", token, temp_dir,
                     process.pid)
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if api_status(head, "/api/version", auth=True) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Jobs API did not come up in {HEAD_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield head
    finally:
        stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
