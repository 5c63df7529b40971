"""CPU batch streams: several forward batches at once, each on a thread of its own with one intra-op thread.

Why: a forward split over 2 OpenMP threads waits at every op's barrier for the slower thread, so any
other process on the node (a Ray worker, the driver) stalls both cores. On 2 cores, a process busy 15%
of one core cost the 2-thread forward 17%; two streams matched it on a quiet machine and were 7% faster
beside that load, and 20k-document pipeline jobs ran 15% faster (BENCHMARKS.md, machine D).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@functools.cache
def per_thread_intra_op() -> bool:
    """True where `torch.set_num_threads` in a thread sets that thread's count only: ATen's OpenMP
    backend (an OpenMP ICV is per thread). Streams rely on it to leave the caller's threads alone."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


class CpuStreams:
    """Runs jobs `count` at a time on threads that each compute with one intra-op thread.

    The threads are made on first use and kept, so the weights the jobs share stay warm in their
    caches; with `count` 1 or a lone job, work runs in the caller's thread with the caller's threads.
    """

    def __init__(self, count: int = 1):
        if count < 1:
            raise ValueError(f"cpu_streams must be >= 1, got {count}")
        if count > 1 and not per_thread_intra_op():
            raise ValueError("cpu_streams > 1 needs torch's OpenMP parallel backend (per-thread thread counts)")
        self.count = count
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], jobs: Sequence[T]) -> Iterator[R]:
        """`fn(job)` for every job, yielded in completion order; a job's exception reaches the caller.

        Grad mode is per thread: `fn` must set the mode it needs itself.
        """
        if self.count < 2 or len(jobs) < 2:
            yield from map(fn, jobs)
            return
        pool = self._threads()
        queued = iter(jobs)
        running: set[Future[R]] = {pool.submit(fn, job) for job in itertools.islice(queued, self.count)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            running |= {pool.submit(fn, job) for job in itertools.islice(queued, len(done))}  # busy while the caller consumes
            for future in done:
                yield future.result()

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.count, thread_name_prefix="encoder-stream", initializer=torch.set_num_threads, initargs=(1,)
            )
        return self._pool
