"""Where tensors and modules run: device names, moving a module (or a model's shell) to an accelerator and back.

Layer-by-layer offload (``qavtp calibrate --device cuda``) is built from these.

The model stays in host memory. The work that touches every parameter once (the rotations, the
statistics, GPTQ, the quantization itself) visits the accelerator one decoder layer at a time, as in
the GPTQ and QuaRot reference code: peak accelerator memory is one decoder layer, the calibration
set's hidden states and, while the inputs of layer 0 are captured, the model minus its decoder layers
(vision tower, projector, embeddings, head). So a 7B/13B model calibrates on one GPU however little of
its float32 weights (28 GB for 7B, 52 GB for 13B) would fit there beside the activations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qavtp.errors import QavtpError


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """``--device``: ``None``/``cpu`` run in place; ``cuda``, ``cuda:1``, ... must exist."""
    if name is None or isinstance(name, torch.device):
        return name
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise QavtpError(f"--device {name!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise QavtpError(f"--device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise QavtpError(f"--device {name!r}: torch sees no CUDA device (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QavtpError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU: only with AVX512-BF16 or AMX instructions that torch and oneDNN
    may use. Elsewhere they are emulated (measured on an AVX2-only EPYC: 7.5x slower than fp32). Honours the
    ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` limits, with which an AVX2 CPU can be imitated."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not any(k in isa for k in ("BF16", "AMX", "ALL")):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device | None = None) -> bool:
    """``precision`` (auto, bf16, fp32) as an autocast switch: auto takes bf16 on a GPU, and on a CPU that has it."""
    if precision != "auto":
        return precision == "bf16"
    return device is not None and device.type == "cuda" or cpu_has_fast_bf16()


def describe(device: torch.device | None) -> str:
    """What :func:`resolve_device` returned, for the artifact's record: the CPU or a named CUDA device."""
    return "cpu" if device is None else f"{device} ({torch.cuda.get_device_name(device)})"


def home_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def visiting(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """``module`` on ``device`` inside the block, back where it was after (also when the block raises).

    Modules created inside the block on ``device`` (the quantized linears that replace the float ones)
    travel back with it.
    """
    if device is None:
        yield module
        return
    home = home_of(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextmanager
def shell_visiting(adapter, device: torch.device | None) -> Iterator[None]:
    """Every module of the model except the decoder layers on ``device`` inside the block."""
    if device is None:
        yield
        return
    home = home_of(adapter.model)
    inner = {id(m) for m in adapter.decoder_layers.modules()}
    shell = [m for m in adapter.model.modules() if id(m) not in inner]
    try:
        for m in shell:
            m._apply(lambda t: t.to(device), recurse=False)
        yield
    finally:
        for m in shell:
            m._apply(lambda t: t.to(home), recurse=False)


def to_device(batch: Mapping, device: torch.device | None) -> dict:
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def reset_peak(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device | None) -> float | None:
    """Peak memory torch allocated on ``device`` since :func:`reset_peak` (None on the CPU)."""
    if device is None or device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
