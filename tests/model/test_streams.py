"""CPU batch streams (`model.streams`): several batches forward at once, one thread each, with the same results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from shared_data import minilm_dir, sts_sentences

from model import load_encoder
from model.streams import CpuStreams, per_thread_intra_op

MAX_BATCH_TOKENS = 512  # small batches, so a few hundred sentences make dozens of them


@pytest.fixture(scope="module")
def encoders():
    path = str(minilm_dir())
    one, two = (load_encoder(path, device="cpu", dtype=torch.float32, max_batch_tokens=MAX_BATCH_TOKENS, cpu_streams=s)
                for s in (1, 2))
    return one, two


def test_streams_give_the_same_vectors_and_stats_as_one_at_a_time(encoders):
    one, two = encoders
    texts = sts_sentences(300)
    for enc in encoders:
        enc.stats = type(enc.stats)()
    a, b = one.encode(texts), two.encode(texts)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert two.stats.batches > 10 and two.stats.batches == one.stats.batches
    assert (two.stats.sequences, two.stats.real_tokens, two.stats.computed_tokens) == (
        one.stats.sequences, one.stats.real_tokens, one.stats.computed_tokens)


def test_streams_late_chunking_matches(encoders):
    one, two = encoders
    docs = [" ".join(sts_sentences(40)[i : i + 8]) for i in range(0, 40, 8)]
    spans = [[(0, len(d) // 2), (len(d) // 2, len(d))] for d in docs]
    for x, y in zip(one.encode_spans(docs, spans, window=64, overlap=16),
                    two.encode_spans(docs, spans, window=64, overlap=16), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-6, rtol=0)


def test_each_stream_runs_single_threaded_and_the_callers_threads_are_left_alone(encoders, monkeypatch):
    _, two = encoders
    seen: list[tuple[str, int, bool]] = []
    forward = two._forward

    def recording(seqs, tasks):
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return forward(seqs, tasks)

    monkeypatch.setattr(two, "_forward", recording)
    before = torch.get_num_threads()
    two.encode(sts_sentences(200))
    assert torch.get_num_threads() == before
    assert len({name for name, _, _ in seen}) == 2 and all(name.startswith("encoder-stream") for name, _, _ in seen)
    assert all(threads == 1 and inference for _, threads, inference in seen)


def test_a_single_batch_runs_in_the_callers_thread(encoders, monkeypatch):
    _, two = encoders
    names: list[str] = []
    forward = two._forward
    monkeypatch.setattr(two, "_forward", lambda s, t: names.append(threading.current_thread().name) or forward(s, t))
    two.encode(["one short sentence", "one short sentence"])  # equal lengths: one batch
    assert names == [threading.current_thread().name]


def test_an_error_in_a_stream_reaches_the_caller(encoders, monkeypatch):
    _, two = encoders

    def failing(seqs, tasks):
        raise RuntimeError("out of memory in a stream")

    monkeypatch.setattr(two, "_forward", failing)
    with pytest.raises(RuntimeError, match="out of memory in a stream"):
        two.encode(sts_sentences(200))


def test_streams_must_be_positive():
    with pytest.raises(ValueError, match="cpu_streams"):
        load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32, cpu_streams=0)


@pytest.mark.skipif(not per_thread_intra_op(), reason="streams need torch's OpenMP backend")
def test_two_streams_run_two_jobs_at_once_each_exactly_once_on_one_thread():
    streams = CpuStreams(2)
    lock, running, peak = threading.Lock(), [0], [0]

    def job(x: int) -> tuple[int, int]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)  # long enough for the other stream to start
        with lock:
            running[0] -= 1
        return x, torch.get_num_threads()

    out = list(streams.map(job, list(range(7))))
    assert sorted(x for x, _ in out) == list(range(7))
    assert peak[0] == 2 and all(threads == 1 for _, threads in out)


def test_one_stream_runs_jobs_in_order_in_the_callers_thread():
    names = list(CpuStreams(1).map(lambda x: (x, threading.current_thread().name), [3, 1, 2]))
    assert names == [(x, threading.current_thread().name) for x in (3, 1, 2)]
    with pytest.raises(ValueError, match="cpu_streams must be >= 1, got 0"):
        CpuStreams(0)
