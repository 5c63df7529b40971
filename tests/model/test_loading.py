"""Model references (local dir, s3:// URL, offline hub cache), family detection, strict loading."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from shared_data import minilm_dir

from model import describe_model, detect_family, load_encoder
from model.loading import resolve_dtype, resolve_model_dir

TEXTS = ["A man is playing a guitar.", "Late chunking keeps context."]


@pytest.fixture(scope="module")
def reference_vectors():
    return load_encoder(str(minilm_dir()), device="cpu").encode(TEXTS)


def test_families_are_detected(tiny_jina_dir, tmp_path):
    assert detect_family(tiny_jina_dir) == "jina-v3"
    assert detect_family(minilm_dir()) == "sentence-transformers"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="lora_adaptations.*modules.json"):
        detect_family(tmp_path)


def test_defaults_on_cpu(tiny_jina_dir):
    enc = load_encoder(str(tiny_jina_dir))
    assert enc.device.type == "cpu" and enc.dtype == resolve_dtype("auto", torch.device("cpu"))
    assert enc.max_length == 8192 and enc.info.default_task == "retrieval.passage"
    assert describe_model(str(tiny_jina_dir)).info == enc.info  # no weights needed to describe


def test_s3_model_directory_is_copied_once(s3_env, tmp_path, monkeypatch, reference_vectors):
    import s3fs

    monkeypatch.setenv("EMBEDLAKE_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url, key="testing", secret="testing")
    remote = f"{s3_env.bucket}/models/minilm"
    fs.put(str(minilm_dir()) + "/", remote, recursive=True)
    url = f"s3://{remote}"
    opts = {"endpoint_url": s3_env.endpoint_url, "key": "testing", "secret": "testing"}
    local = resolve_model_dir(url, opts)
    assert local.is_relative_to(tmp_path / "cache") and (local / "model.safetensors").is_file()
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    enc = load_encoder(url, device="cpu", storage_options=opts)
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not fetched again
    torch.testing.assert_close(torch.from_numpy(enc.encode(TEXTS)), torch.from_numpy(reference_vectors), atol=1e-6, rtol=0)


def test_hub_id_resolves_offline_from_the_hf_cache(tmp_path, monkeypatch, reference_vectors):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    shutil.copytree(minilm_dir(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    assert enc.info.name == "sentence-transformers/all-MiniLM-L6-v2" and enc.info.revision == commit[:12]
    torch.testing.assert_close(torch.from_numpy(enc.encode(TEXTS)), torch.from_numpy(reference_vectors), atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="could not resolve hub model"):
        load_encoder("nobody/not-cached", device="cpu")


def test_loader_is_strict(tiny_jina_dir, tmp_path):
    def broken(edit):
        d = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_jina_dir, d)
        state = load_file(str(d / "model.safetensors"))
        edit(state)
        save_file(state, str(d / "model.safetensors"))
        return str(d)

    with pytest.raises(ValueError, match="checkpoint tensors, expected"):
        load_encoder(broken(lambda s: s.pop("roberta.emb_ln.bias")), device="cpu")
    with pytest.raises(ValueError, match="shape"):
        load_encoder(broken(lambda s: s.update({"roberta.emb_ln.bias": torch.zeros(3)})), device="cpu")

    def rename(s):
        s["roberta.emb_ln.beta"] = s.pop("roberta.emb_ln.bias")

    with pytest.raises(KeyError, match="no place in the model"):
        load_encoder(broken(rename), device="cpu")
    no_weights = tmp_path / "pickle-only"
    shutil.copytree(tiny_jina_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_encoder(str(no_weights), device="cpu")


@pytest.mark.parametrize("arch", ["bert", "mpnet"])  # the native trunk; transformers (model.st_encoder)
def test_pickle_weights_are_refused_and_remote_code_never_runs(arch, tmp_path):
    """Only safetensors are read: a directory whose weights are `pytorch_model.bin` alone is refused, naming
    safetensors. A config's `auto_map` (remote code that would leave a marker file if run) is ignored: the
    built-in architecture loads and the code never runs (trust_remote_code=True would import it)."""
    from tiny_st import make_tiny_st

    d = make_tiny_st(tmp_path / arch, arch)
    marker = tmp_path / "remote-code-ran"
    (d / "custom_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_modeling.Config", "AutoModel": "custom_modeling.Model"}
    (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    describe_model(str(d))
    assert load_encoder(str(d), device="cpu").encode(TEXTS).shape == (2, 32)
    assert not marker.exists()

    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # the same bytes, under the pickle name
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(pickle checkpoints are not loaded\)"):
        load_encoder(str(d), device="cpu")
    assert not marker.exists()


def test_cpu_kernel_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    from model.loading import CPU_KERNEL_CACHE_ENTRIES, CPU_KERNEL_CACHE_VARS

    onednn, ideep = CPU_KERNEL_CACHE_VARS
    monkeypatch.delenv(onednn, raising=False)
    monkeypatch.setenv(ideep, "512")
    load_encoder(str(minilm_dir()), device="cpu")
    assert os.environ[onednn] == str(CPU_KERNEL_CACHE_ENTRIES)
    assert os.environ[ideep] == "512"  # the user's choice stands
