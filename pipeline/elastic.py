"""The encoder pool on clusters whose GPU nodes come and go (issue #17): where actors run, how many, and
what the run saw of them.

Autoscaled clusters often start a job with zero GPU nodes (`minReplicas: 0`, spot groups). Deciding
CPU or GPU from the resources up at that moment runs such a job on CPU and never asks for a GPU, so
`--device gpu` requests one-GPU actors regardless, and a range of actors becomes an autoscaling pool
that grows as GPU nodes join. Both decisions are pure functions here, logged with their reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import ActorRange, Device

# A pool actor reports each call's (start, end); the report counts the actors busy in each interval of
# this length. Calls last well under it (a 4,096-document sort window: ~0.3 s on a GPU, seconds on CPU),
# so an actor with work is seen in every interval it is alive.
ACTOR_INTERVAL_S = 10.0


@dataclass(frozen=True)
class PoolLayout:
    """Where the encoder actors run and the pool's bounds (min == max: a fixed pool)."""

    device: Literal["gpu", "cpu"]
    min_actors: int
    max_actors: int
    why: str  # one line for the log: how the device and the size were chosen
    initial_actors: int | None = None  # actors the pool starts (pending ones are the autoscaler's demand)


def choose_layout(device: Device, actors: ActorRange | None, *, gpus_now: int, max_gpus: int | None,
                  cpu_actors: int) -> PoolLayout:
    """The pool for `--device` and `--actors` on a cluster with `gpus_now` GPUs up, `max_gpus` reachable
    through its autoscaler (None: not readable), and `cpu_actors` the CPU-only default count.

    auto keeps the pre-#17 rule: GPU actors when a GPU is up, one per GPU, else CPU actors.
    """
    if device == "auto":
        device = "gpu" if gpus_now else "cpu"
        why = (f"device auto: gpu, {gpus_now} GPU(s) up at start" if gpus_now else
               "device auto: cpu, no GPU up at start (--device gpu asks the autoscaler for GPU nodes)")
        if actors is None:
            actors = ActorRange(gpus_now or cpu_actors, gpus_now or cpu_actors)
    elif device == "cpu":
        why = "device cpu: no actor asks for a GPU"
        if actors is None:
            actors = ActorRange(cpu_actors, cpu_actors)
    else:
        why = f"device gpu: one-GPU actors, {gpus_now} GPU(s) up at start"
        if actors is None:
            actors = ActorRange(1, None)
    if actors.max is not None:
        high, size = actors.max, f"actors {actors}"
    elif device == "gpu" and max_gpus:
        high = max(max_gpus, actors.min)
        size = f"actors {actors.min}..{high}: the autoscaler can reach {max_gpus} GPU(s)"
    else:
        reach = gpus_now if device == "gpu" else cpu_actors
        high = max(reach, actors.min)
        size = (f"actors {actors.min}..{high}: the autoscaler's limits are not readable, so up to the {reach} "
                f"{device.upper()} actor(s) the cluster holds now (pass --actors MIN..MAX to go beyond)")
    # Ray Data 2.60 grows a pool only into resources the cluster has now, and its own requests to the
    # autoscaler need a cluster config the OSS autoscaler does not report (and overwrite any the job makes
    # with `request_resources`). So the pool starts at its maximum: its pending one-GPU actors are the
    # demand the autoscaler adds GPU nodes for, and encoding starts as soon as the first is up.
    initial = high if device == "gpu" and high > gpus_now else None
    return PoolLayout(device, actors.min, high, f"{why}; {size}", initial)


def actor_call(actor: str, start: float, end: float) -> str:
    """One encoder call as the report's timeline reads it (epoch seconds, so actors on any node agree)."""
    return f"{start:.3f} {end:.3f} {actor}"


def pool_timeline(calls: dict[str, int] | list[str], interval_s: float = ACTOR_INTERVAL_S) -> dict:
    """Actors busy per interval over the run, from `actor_call` strings: min and max of that count
    between the first call's start and the last one's end, and the nodes that ran encoders.

    An interval in which no actor finished or ran a call counts 0 (e.g. every GPU node was lost).
    """
    spans = []
    for call in calls:
        start, end, actor = call.split(" ", 2)
        spans.append((float(start), float(end), actor))
    if not spans:
        return {"interval_s": interval_s, "min": 0, "max": 0, "counts": [], "actors": 0, "nodes": []}
    t0 = min(s for s, _, _ in spans)
    busy: dict[int, set[str]] = {}
    for start, end, actor in spans:
        for k in range(int((start - t0) // interval_s), int((end - t0) // interval_s) + 1):
            busy.setdefault(k, set()).add(actor)
    counts = [len(busy.get(k, ())) for k in range(max(busy) + 1)]
    actors = {a for _, _, a in spans}
    nodes = sorted({part.split("=", 1)[1] for a in actors for part in a.split() if part.startswith("node=")})
    return {"interval_s": interval_s, "min": min(counts), "max": max(counts), "counts": counts,
            "actors": len(actors), "nodes": nodes}
