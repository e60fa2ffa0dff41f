"""Which attention backend the dispatch point chooses, and how it calls flash-attn 4, on
CPU: the CUDA capability and the flash-attn imports are faked (the kernels themselves run
in tests/integration/test_attention_backends.py on a GPU)."""

from __future__ import annotations

import pytest
import torch

from splitllama import attention

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def fake_flash_attn_4(calls: list):
    """Stands in for ``flash_attn.cute.flash_attn_varlen_func``: records its arguments and
    returns ``(out, lse)`` as the real one does."""
    def varlen(q, k, v, **kwargs):
        calls.append({"q": q, "k": k, "v": v, **kwargs})
        return torch.zeros_like(q), None
    return varlen


@pytest.fixture
def machine(monkeypatch):
    """``machine(capability, flash_attn_4=bool, flash_attn_2=bool)`` fakes the GPU and the
    packages; torch's varlen counts as importable."""
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    calls: list = []

    def set_up(capability=(9, 0), flash_attn_4=True, flash_attn_2=False):
        monkeypatch.setattr(attention, "_cuda_capability", lambda device: capability)
        fa4 = fake_flash_attn_4(calls) if flash_attn_4 else None
        monkeypatch.setattr(attention, "flash_attn_4_varlen", lambda: fa4)
        monkeypatch.setattr(attention, "flash_attn_varlen_func", object() if flash_attn_2 else None)

        def torch_varlen(q, k, v, *args, **kwargs):
            calls.append({"torch_varlen": q.shape})
            return torch.zeros_like(q)

        monkeypatch.setattr(attention, "varlen_attn", torch_varlen)
        monkeypatch.setattr(attention, "_varlen_kwargs", lambda: {})
        return calls

    return set_up


@pytest.mark.parametrize("capability,importable,dtype,expected", [
    ((9, 0), True, torch.bfloat16, "flash_attn_4"),   # Hopper with flash-attn 4: the default
    ((9, 0), True, torch.float16, "flash_attn_4"),
    ((9, 0), False, torch.bfloat16, "torch_varlen"),  # not installed
    ((8, 0), True, torch.bfloat16, "torch_varlen"),   # not measured on other GPUs: never by default
    ((10, 0), True, torch.bfloat16, "torch_varlen"),
    ((9, 0), True, torch.float32, "flex"),            # 16-bit kernels only
])
def test_default_choice(machine, capability, importable, dtype, expected):
    machine(capability, flash_attn_4=importable)
    assert attention.select_backend(CUDA, dtype) == expected


def test_cpu_is_sdpa_whatever_is_installed(machine):
    machine(flash_attn_4=True, flash_attn_2=True)
    assert attention.select_backend(CPU, torch.float64) == "sdpa"
    assert attention.available_backends(CPU, torch.bfloat16) == ["sdpa"]


@pytest.mark.parametrize("forced,capability,fa4,fa2,expected", [
    ("flash_attn_4", (8, 0), True, False, "flash_attn_4"),  # forceable where it imports
    ("torch_varlen", (9, 0), True, False, "torch_varlen"),
    ("flash_attn", (9, 0), True, True, "flash_attn"),       # flash-attn 2 stays forceable
    ("flash_attn_4", (9, 0), False, False, ValueError),     # not installed
    ("flash_attn", (9, 0), True, False, ValueError),
    ("flash_attn_5", (9, 0), True, False, ValueError),      # no such backend
])
def test_forced_choice(machine, monkeypatch, forced, capability, fa4, fa2, expected):
    machine(capability, flash_attn_4=fa4, flash_attn_2=fa2)
    monkeypatch.setenv(attention.BACKEND_ENV, forced)
    if expected is ValueError:
        with pytest.raises(ValueError, match=attention.BACKEND_ENV):
            attention.select_backend(CUDA, torch.bfloat16)
    else:
        assert attention.select_backend(CUDA, torch.bfloat16) == expected


def gpu_plan(monkeypatch, cu: torch.Tensor, longest: int, tokens: int):
    """``plan_packed`` as it plans on an SM90 GPU (the choice made for CUDA; the tensors
    stay on the CPU, where the fakes run)."""
    select, available = attention.select_backend, attention.available_backends
    monkeypatch.setattr(attention, "select_backend", lambda device, dtype: select(CUDA, dtype))
    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: available(CUDA, dtype))
    return attention.plan_packed(cu, longest, tokens, torch.bfloat16)


def test_flash_attn_4_call(machine, monkeypatch):
    """The plan calls flash-attn 4 causal, with the packed documents' boundaries, the
    layer's scale and K/V in their groups (not repeated per query head)."""
    calls = machine()
    cu = torch.tensor([0, 1, 5, 8], dtype=torch.int32)  # documents of 1, 4 and 3 tokens
    plan = gpu_plan(monkeypatch, cu, 4, 8)
    assert (plan.backend, plan.fallback) == ("flash_attn_4", "torch_varlen")
    q = torch.randn(8, 1, 8, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(8, 1, 2, 128, dtype=torch.bfloat16) for _ in range(2))
    out = plan.attend(q, k, v, 0.25)
    assert out.shape == (8, 1, 8 * 128)
    (call,) = calls
    assert call["q"].shape == (8, 8, 128) and call["k"].shape == call["v"].shape == (8, 2, 128)
    assert call["causal"] is True and call["softmax_scale"] == 0.25
    assert call["cu_seqlens_q"] is cu and call["cu_seqlens_k"] is cu
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == 4


def test_unchecked_head_dim_runs_the_next_default(machine, monkeypatch):
    """flash-attn 4's backward is wrong at head dim 8 (measured): chosen by default, it
    hands such a layer to torch's varlen kernel."""
    calls = machine()
    plan = gpu_plan(monkeypatch, torch.tensor([0, 4], dtype=torch.int32), 4, 4)
    q = torch.randn(4, 1, 4, 8, dtype=torch.bfloat16)
    plan.attend(q, q[:, :, :2], q[:, :, :2], 1.0)
    assert calls == [{"torch_varlen": (4, 4, 8)}]


def test_forced_flash_attn_4_refuses_an_unchecked_head_dim(machine, monkeypatch):
    machine()
    monkeypatch.setenv(attention.BACKEND_ENV, "flash_attn_4")
    plan = gpu_plan(monkeypatch, torch.tensor([0, 4], dtype=torch.int32), 4, 4)
    assert (plan.backend, plan.fallback) == ("flash_attn_4", None)
    q = torch.randn(4, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="checked at head dims"):
        plan.attend(q, q[:, :, :2], q[:, :, :2], 1.0)


def test_the_check_report_names_each_head_dims_backend(machine, monkeypatch):
    """`splitllama check` reports the backend the model's layers run: where flash-attn 4 is
    the default and the stacks' head dims are 8 and 128, one per head dim; on CPU, sdpa."""
    from splitllama.verify.check import attention_backends
    from splitllama.verify.tiny import tiny_split_config

    machine()
    config = tiny_split_config(upper={"head_dim": 128})
    assert attention_backends(config, "cpu", torch.float64) == "sdpa"
    select, available = attention.select_backend, attention.available_backends
    monkeypatch.setattr(attention, "select_backend", lambda device, dtype: select(CUDA, dtype))
    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: available(CUDA, dtype))
    assert attention_backends(config, "cuda", torch.bfloat16) == "torch_varlen (head dim 8), flash_attn_4 (head dim 128)"
    assert attention_backends(tiny_split_config(), "cuda", torch.bfloat16) == "torch_varlen"
