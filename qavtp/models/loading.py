"""Loading a multimodal checkpoint from a local directory, with one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qavtp.errors import QavtpError
from qavtp.models import llava as _llava  # noqa: F401  (registers the adapter)
from qavtp.models import reference
from qavtp.models.base import Adapter, adapter_class, supported_model_types

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A model directory: the name of the embedded reference model (assembled on first use) or a path."""
    if str(model) == reference.NAME:
        return reference.assemble(cache_dir)
    return Path(model)


def check_checkpoint(path: Path) -> dict:
    """Read and validate config.json and the safetensors headers without loading any weights."""
    from safetensors import safe_open

    if not path.exists():
        raise QavtpError(f"model directory not found: {path}")
    if not path.is_dir():
        raise QavtpError(f"model path is not a directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QavtpError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise QavtpError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if adapter_class(model_type) is None:
        raise QavtpError(
            f"unsupported architecture {model_type!r} in {cfg_file}; supported: {', '.join(supported_model_types())}"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise QavtpError(f"{path} has no .safetensors weights (pickled .bin weights are not loaded)")
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise QavtpError(f"corrupt safetensors file {w}: {e}") from None
    return config


def load_model(
    model: str | os.PathLike = reference.NAME,
    dtype: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, object, Adapter]:
    """Model, processor and adapter for a local checkpoint (or the reference model's name)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise QavtpError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve(model, cache_dir)
    config = check_checkpoint(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar per load is noise, and hides the one-line errors
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        net = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QavtpError(f"could not load {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    net.eval()
    return net, processor, adapter_class(config["model_type"])(net)
