"""Training's compute precision follows the hardware: bf16 autocast only where the CPU has bf16 instructions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qavtp.config import AlignConfig, ConfigError, StageConfig
from qavtp.device import cpu_has_fast_bf16, use_bf16

PROBE = "from qavtp.device import cpu_has_fast_bf16; print(cpu_has_fast_bf16())"


def _probe(**env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True)
    return out.stdout.strip()


def test_an_avx2_cpu_gets_fp32():
    # The imitation of an AVX2-only CPU that torch and oneDNN both honour: bf16 there is emulated, 7x slower.
    assert _probe(ATEN_CPU_CAPABILITY="avx2") == "False"
    assert _probe(ONEDNN_MAX_CPU_ISA="AVX2") == "False"


def test_explicit_precision_wins_and_auto_follows_the_cpu():
    assert use_bf16("bf16") is True and use_bf16("fp32") is False
    assert use_bf16("auto") is cpu_has_fast_bf16()
    assert use_bf16("auto", torch.device("cuda")) is True
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in flags:
        assert cpu_has_fast_bf16()  # this machine (the developers' AVX512-BF16 CPUs)
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        AlignConfig(precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        StageConfig(1, precision="half")


def test_alignment_records_the_precision_it_ran_in(tiny_llava_dir):
    from qavtp.calibrate.align import align_projector, alignment_data
    from qavtp.models.loading import load_model

    student, processor, adapter = load_model(tiny_llava_dir)
    teacher, _, _ = load_model(tiny_llava_dir)
    train, held = alignment_data("easy-vqa", 1, 2, 4, seed=0)
    rec = align_projector(
        adapter, teacher, processor, train, held, AlignConfig(1, batch_size=2, precision="fp32"), progress=False
    )
    assert rec["precision"] == "fp32" and rec["bf16"] is False
