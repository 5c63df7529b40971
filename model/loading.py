"""`load_encoder`: a model reference -> a ready `Encoder`, family detected from the directory.

A reference is a local directory, an fsspec URL of one (s3://..., copied once per node into a
local cache), or a Hugging Face hub id resolved through the normal HF cache (works offline with
HF_HUB_OFFLINE=1 when cached). Weights load from safetensors only; remote code never runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from model.encoder import Encoder, EncoderInfo
from model.streams import per_thread_intra_op
from model.tokenization import TextTokenizer

Family = Literal["jina-v3", "jina-v4", "sentence-transformers"]

DEFAULT_MAX_BATCH_TOKENS = {"cuda": 65536, "cpu": 16384}  # performance spec §6: 32k-64k on 80 GB

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of native bf16 multiply units


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs that multiply bf16 in hardware: AMX-BF16 tiles (Intel Sapphire Rapids and later) or
    AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later).

    There oneDNN runs bf16 GEMMs with fp32 accumulation at 3-4x the fp32 rate (measured 880 against 207
    GFLOP/s on a 2-core Zen 4, 1,089 against 250 on a 2-core Sapphire Rapids); without them bf16 is
    emulated and far slower than fp32 (performance spec §7.1), so "auto" keeps fp32.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell cheaply, stay exact
        return False
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_dtype(precision: Precision | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype for a precision choice on a device.

    "auto": bfloat16 where the hardware multiplies bf16 natively (CUDA, CPUs with AMX or AVX512-BF16), float32
    otherwise. Pooling and normalization always run in float32 whatever the choice.
    """
    if isinstance(precision, torch.dtype):
        return precision
    precision = precision or "auto"
    check_precision(precision)
    if precision == "auto":
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native_bf16 else torch.float32
    return getattr(torch, precision)


# Per-shape caches of the CPU kernels: oneDNN's primitive cache and ideep's LRU of prepared matmuls
# (torch's bf16 CPU path goes through both), 1,024 entries each by default. Every padded batch has a
# shape of its own, so a long CPU job fills both: measured in one process over calls of 4,096 STS
# sentences (bf16), private memory grew from 0.41 to 0.91 GB before levelling off after ~45k
# sentences. At 128 entries each it stays at 0.42 GB, at the same speed: a forward pass reuses each
# of its few shapes in every layer, and that is all the caches need to hold.
CPU_KERNEL_CACHE_ENTRIES = 128
CPU_KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_cpu_kernel_caches() -> None:
    """Cap the CPU kernel caches unless the user set them. Both libraries read their variable when
    their cache is first used, so this must run before the process's first CPU matmul."""
    for var in CPU_KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(CPU_KERNEL_CACHE_ENTRIES))


def is_jina_v4_config(config: dict) -> bool:
    """jina-v4's config.json has no top-level model_type (spec §7.2): it is known by its architecture, or by
    the jina extras beside a Qwen2.5-VL text_config."""
    if "JinaEmbeddingsV4Model" in (config.get("architectures") or []):
        return True
    text = config.get("text_config") or {}
    return "task_names" in config and "multi_vector_projector_dim" in config and text.get("model_type") == "qwen2_5_vl_text"


def detect_family(path: Path) -> Family:
    config = _read_json(path / "config.json")
    if "lora_adaptations" in config and config.get("position_embedding_type", "rotary") == "rotary":
        return "jina-v3"
    if is_jina_v4_config(config):
        return "jina-v4"
    if (path / "modules.json").is_file():
        return "sentence-transformers"
    raise ValueError(
        f"{path} is not a model directory embedlake can load. Expected the published "
        "jina-embeddings-v3 layout (config.json with 'lora_adaptations', safetensors weights named "
        "'roberta....parametrizations...', tokenizer.json), the published jina-embeddings-v4 layout "
        "(config.json with architectures ['JinaEmbeddingsV4Model'] and 'task_names', "
        "model.safetensors.index.json and its shards, adapters/adapter_config.json and "
        "adapters/adapter_model.safetensors, tokenizer.json, preprocessor_config.json) or a "
        "sentence-transformers directory (modules.json, 1_Pooling/config.json, sentence_bert_config.json, "
        "a transformers model with safetensors weights and tokenizer.json)."
    )


def model_cache_dir() -> Path:
    return Path(os.environ.get("EMBEDLAKE_CACHE", Path.home() / ".cache" / "embedlake")) / "models"


def resolve_model_dir(ref: str | os.PathLike, storage_options: dict | None = None) -> Path:
    ref = str(ref)
    if "://" in ref and not ref.startswith("file://"):
        return _fetch_remote(ref, storage_options or {})
    local = Path(ref.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ValueError(f"{ref} is a file; a model reference is a directory, URL or hub id")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return _from_hub(ref)
    raise FileNotFoundError(f"model directory {ref} does not exist")


def _fetch_remote(url: str, storage_options: dict) -> Path:
    """Copy a remote model directory once per node; concurrent actors wait on a file lock."""
    import fsspec
    from filelock import FileLock

    target = model_cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:24]
    done = target / ".embedlake-complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
            if not fs.isdir(root):
                raise FileNotFoundError(f"model directory {url} does not exist")
            partial = target.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            done.write_text(url)
    return target


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # "*.txt": merges; "*/*.json", "*/*.safetensors": jina-v4's adapters/ (and sentence-transformers' modules)
        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*/*.json", "*/*.safetensors"]
        ))
    except Exception as err:  # offline without a cached snapshot, unknown repo, ...
        raise FileNotFoundError(f"could not resolve hub model {repo_id!r}: {err}") from err


def content_revision(path: Path) -> str:
    """A short hash of config and weights: the identity recorded next to every vector."""
    if path.parent.name == "snapshots":  # HF cache: the directory name is the commit
        return path.name[:12]
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:12]


def model_name(path: Path, family: Family) -> str:
    """Hub id when known (HF cache layout, or jina's published config), else the directory name."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    declared = _read_json(path / "config.json").get("_name_or_path") or ""
    if family in ("jina-v3", "jina-v4") and declared and not declared.startswith(("/", ".")):
        return declared
    return path.name if path.name not in ("model", "models", "snapshot") else path.parent.name


def model_identity(path: Path, family: Family, revision: str | None) -> dict[str, str]:
    """Name and revision of a model directory; a known `revision` (the driver's) skips hashing the weights,
    which every worker and actor would otherwise do again."""
    return dict(name=model_name(path, family), revision=revision or content_revision(path))


@dataclass(frozen=True)
class ModelDescription:
    path: Path
    family: Family
    tokenizer: TextTokenizer
    info: EncoderInfo


def describe_model(
    ref: str | os.PathLike, *, storage_options: dict | None = None, revision: str | None = None
) -> ModelDescription:
    """Tokenizer and model facts without loading weights: what CPU preprocessing stages need.

    A known `revision` skips hashing the weights (`model_identity`).
    """
    path = resolve_model_dir(ref, storage_options)
    family = detect_family(path)
    ident = model_identity(path, family, revision)
    if family == "jina-v3":
        from model.jina_encoder import describe_jina_v3

        tokenizer, info = describe_jina_v3(path, **ident)
    elif family == "jina-v4":
        from model.jina_v4_encoder import describe_jina_v4

        tokenizer, info = describe_jina_v4(path, **ident)
    else:
        from model.st_encoder import describe_sentence_transformer

        tokenizer, info = describe_sentence_transformer(path, **ident)
    return ModelDescription(path, family, tokenizer, info)


def load_encoder(
    ref: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: Precision | torch.dtype | None = None,
    max_batch_tokens: int | None = None,
    storage_options: dict | None = None,
    cpu_streams: int | None = None,
    revision: str | None = None,
) -> Encoder:
    """Load an encoder on CUDA when a GPU is present, else CPU; dtype per `resolve_dtype` ("auto").

    Pass dtype="float32" for reference-exact vectors on any hardware. On CPU, `cpu_streams` batches
    run at once, one thread each (default: the caller's torch thread count; 1 = one batch at a time
    on all of them). See `model.streams`. A known `revision` skips hashing the weights (`model_identity`).
    """
    path = resolve_model_dir(ref, storage_options)
    family = detect_family(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        bound_cpu_kernel_caches()
    dtype = resolve_dtype(dtype, device)
    budget = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS.get(device.type, DEFAULT_MAX_BATCH_TOKENS["cpu"])
    if cpu_streams is None:
        cpu_streams = torch.get_num_threads() if device.type == "cpu" and per_thread_intra_op() else 1
    common = dict(device=device, dtype=dtype, max_batch_tokens=budget, cpu_streams=cpu_streams,
                  **model_identity(path, family, revision))
    if family == "jina-v3":
        from model.jina_encoder import JinaV3Encoder

        return JinaV3Encoder.from_dir(path, **common)
    if family == "jina-v4":
        from model.jina_v4_encoder import JinaV4Encoder

        return JinaV4Encoder.from_dir(path, **common)
    from model.st_encoder import SentenceTransformerEncoder

    return SentenceTransformerEncoder(path, **common)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
