"""Which varlen kernel the packed GPU path uses, and (on CUDA) that each one matches SDPA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model import attention
from model.attention import default_impl, kernel_name, varlen, varlen_kernel, varlen_reference

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_TORCH_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None


def test_kernel_preference_flash_attn_then_torch():
    kernel = varlen_kernel()
    if HAS_FLASH_ATTN:
        assert kernel is not None and kernel.source == "flash-attn"
    elif HAS_TORCH_VARLEN:
        assert kernel is not None and kernel.source == "torch"
    else:
        assert kernel is None


@pytest.mark.skipif(not HAS_TORCH_VARLEN, reason="torch < 2.9 has no built-in varlen kernel")
def test_packed_path_chosen_on_cuda_16bit_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert default_impl(cuda, torch.bfloat16) == "varlen" and default_impl(cuda, torch.float16) == "varlen"
    assert default_impl(cuda, torch.float32) == "padded"  # FlashAttention kernels are 16-bit only
    assert default_impl(cpu, torch.bfloat16) == "padded"
    assert kernel_name("varlen").endswith(" varlen") and kernel_name("padded") == "sdpa, padded"


def test_no_kernel_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: None)
    assert attention.default_impl(torch.device("cuda"), torch.bfloat16) == "padded"
    with pytest.raises(RuntimeError, match="no varlen attention kernel"):
        varlen(torch.tensor([0, 3], dtype=torch.int32), 3)


def _packed(lengths: list[int], heads: int, head_dim: int, device: str):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["flash-attn", "torch"])
@pytest.mark.parametrize("head_dim", [32, 64])  # MiniLM and jina-v3
def test_varlen_kernel_matches_sdpa_per_sequence(source, head_dim):
    kernel = {"flash-attn": attention._flash_attn_kernel, "torch": attention._torch_varlen_kernel}[source]()
    if kernel is None:
        pytest.skip(f"{source} varlen kernel not installed")
    q, k, v, cu, longest = _packed([1, 7, 130, 513, 64], heads=4, head_dim=head_dim, device="cuda")
    out = kernel.attend(q, k, v, cu, longest)
    ref = varlen_reference(cu.cpu(), longest)(q.float().cpu(), k.float().cpu(), v.float().cpu())
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert (out.float().cpu() - ref).abs().max() < 2e-2  # bf16 rounding of the inputs and output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["flash-attn", "torch"])
def test_varlen_kernel_causal_gqa_matches_sdpa_per_sequence(source):
    """jina-v4's attention: causal, 8 query heads sharing 2 key/value heads, head dim 128."""
    kernel = {"flash-attn": attention._flash_attn_kernel, "torch": attention._torch_varlen_kernel}[source]()
    if kernel is None:
        pytest.skip(f"{source} varlen kernel not installed")
    q, _, _, cu, longest = _packed([1, 7, 130, 513, 64], heads=8, head_dim=128, device="cuda")
    _, k, v, _, _ = _packed([1, 7, 130, 513, 64], heads=2, head_dim=128, device="cuda")
    out = kernel.attend(q, k, v, cu, longest, True)
    ref = varlen_reference(cu.cpu(), longest, causal=True)(q.float().cpu(), k.float().cpu(), v.float().cpu())
    assert out.shape == q.shape and (out.float().cpu() - ref).abs().max() < 2e-2


def test_varlen_reference_causal_gqa_equals_padded_causal():
    """The CPU stand-in and the padded path agree on causal GQA attention (what the v4 packed tests rely on)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 9, 5]
    q = torch.randn(sum(lengths), 4, 16, generator=gen)
    k, v = (torch.randn(sum(lengths), 2, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 3, 12, 17], dtype=torch.int32)
    packed = varlen_reference(cu, 9, causal=True)(q, k, v)
    for i, n in enumerate(lengths):
        s = int(cu[i])
        mask = torch.ones(1, n, dtype=torch.bool)
        row = attention.padded(mask, causal=True)(q[None, s : s + n], k[None, s : s + n], v[None, s : s + n])[0]
        torch.testing.assert_close(packed[s : s + n], row)
        # token 0 of each sequence attends only to itself: its output is its own value, per head group
        torch.testing.assert_close(packed[s], v[s].repeat_interleave(2, dim=0))


def test_cpu_encoder_does_not_import_torch_varlen():
    """torch's varlen module imports torch._dynamo (about 1 s): a CPU actor must not pay it at start."""
    import subprocess
    import sys

    from shared_data import minilm_dir

    code = (
        "import sys; from model import load_encoder; "
        f"enc = load_encoder({str(minilm_dir())!r}, device='cpu'); "
        "assert enc.attention_impl == 'padded'; "
        "heavy = sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch.nn.attention.varlen'))); "
        "print(heavy[:5]); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
