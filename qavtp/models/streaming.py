"""Checkpoints larger than memory: the model built on the meta device, each decoder layer read when its turn comes.

accelerate's ``init_empty_weights`` builds the model without storage; everything but the decoder layers (vision
tower, projector, embeddings, final norm, LM head) is then read from the shards with safetensors' lazy
``safe_open``. A :class:`LayerStream` on the adapter materialises decoder layer ``i`` (in float32) for the block
of ``adapter.resident(i)`` and puts it back on the meta device after, so peak host memory is one decoder layer
plus what stays resident, whatever the number of layers.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qavtp.calibrate.quantizers import QuantWeight
from qavtp.errors import QavtpError

INDEX = "model.safetensors.index.json"
# llava-hf's checkpoints on the hub predate transformers' current module tree (the names transformers' own
# checkpoint conversion maps on load); a checkpoint saved by today's transformers has the right-hand names already.
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)


def model_name(key: str) -> str:
    """A checkpoint tensor's name in the module tree transformers builds today."""
    for pattern, repl in LEGACY_RENAMES:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


class ShardedCheckpoint:
    """Lazy access to a checkpoint's tensors by their model names: the shard index (or every ``*.safetensors``
    file) read once, each tensor read from its shard only when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise QavtpError(f"{index} is not a safetensors shard index ({type(e).__name__}: {e})") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (path / shard).is_file():
                    raise QavtpError(f"{index} names shard {shard}, which {path} does not have")
        else:
            weight_map, shards = {}, [p.name for p in sorted(path.glob("*.safetensors"))]
        found: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for shard in shards:
            try:
                with safe_open(str(path / shard), framework="pt") as handle:
                    found.update({k: shard for k in handle.keys()})
                    self._shapes.update({k: list(handle.get_slice(k).get_shape()) for k in handle.keys()})
            except Exception as e:  # safetensors' own error types: a truncated shard fails here, header vs size
                raise QavtpError(f"corrupt safetensors file {path / shard}: {e}") from None
        for key, shard in weight_map.items():
            if found.get(key) != shard:
                raise QavtpError(f"{index} places tensor {key} in {shard}, which does not hold it")
        self._where = {model_name(k): (k, s) for k, s in found.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, under the checkpoint's own names (from the headers)."""
        return dict(self._shapes)

    def tensors(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (model names), each shard opened once and closed after: a shard stays mapped only
        while it is read, so the pages read do not pile up in the process's resident memory."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise QavtpError(f"{self.path} holds no tensor {name} (the model needs it)")
            by_shard.setdefault(self._where[name][1], []).append(name)
        out = {}
        for shard, group in by_shard.items():
            with safe_open(str(self.path / shard), framework="pt") as f:
                for name in group:
                    t = f.get_tensor(self._where[name][0])
                    out[name] = t if dtype is None else t.to(dtype)
        return out


def state_names(module: nn.Module) -> list[str]:
    return list(module.state_dict(keep_vars=True))


def materialise(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give ``module``'s meta tensors the values of ``state`` (names relative to ``module``), in their dtypes."""
    from accelerate.utils import set_module_tensor_to_device

    for name, value in state.items():
        set_module_tensor_to_device(module, name, "cpu", value=value)
    _refresh(module)


def release(module: nn.Module) -> None:
    """Back on the meta device: the stored tensors and the dequantized-weight caches; small non-persistent buffers
    (a KV cache's Hadamard) stay, since nothing would bring them back."""
    from accelerate.utils import set_module_tensor_to_device

    for name in state_names(module):
        set_module_tensor_to_device(module, name, "meta")
    for m in module.modules():
        if _is_quant_weight(m):
            m.weight = m.weight.to("meta")
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap that a layer's temporaries freed back to the OS. glibc keeps it otherwise: measured on the
    7B shape, resident memory grew ~0.1 GiB per layer (fragmentation, not live tensors) until an export of 32
    layers peaked at 8.2 GiB; with a trim after each layer it stays at the resident part's 2.9 GiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return
    libc.malloc_trim(0)


def _is_quant_weight(m: nn.Module) -> bool:
    return isinstance(m, QuantWeight)


def _refresh(module: nn.Module) -> None:
    for m in module.modules():
        if _is_quant_weight(m) and not m.qweight.is_meta:
            m.refresh()


def is_streamed(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


class LayerStream:
    """Decoder layer ``i`` resident only inside :meth:`resident` (or while a forward runs through it): read by
    ``source(i, names)`` (module-relative tensor names to tensors), released after."""

    def __init__(self, layers: nn.ModuleList, source: Callable[[int, list[str]], Mapping[str, torch.Tensor]]):
        self.layers, self.source = layers, source
        self.visits = 0  # how many layers were materialised: what the tests check
        # A whole-model forward (evaluation, scoring) reads each layer as the forward reaches it, and drops it after.
        self._open: dict[int, object] = {}
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            layer.register_forward_hook(lambda _m, _a, _o, i=i: self._exit(i), always_call=True)

    def _enter(self, i: int) -> None:
        if is_streamed(self.layers[i]):
            ctx = self.resident(i)
            ctx.__enter__()
            self._open[i] = ctx

    def _exit(self, i: int) -> None:
        ctx = self._open.pop(i, None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    @contextmanager
    def resident(self, i: int) -> Iterator[nn.Module]:
        layer = self.layers[i]
        if not is_streamed(layer):  # already resident (a nested visit): nothing to do
            yield layer
            return
        names = [n for n, t in layer.state_dict().items() if t.is_meta]
        materialise(layer, self.source(i, names))
        self.visits += 1
        try:
            yield layer
        finally:
            release(layer)


def layer_prefix(model: nn.Module, layers: nn.ModuleList, i: int) -> str:
    target = layers[i]
    for name, m in model.named_modules():
        if m is target:
            return name + "."
    raise QavtpError(f"decoder layer {i} is not part of the model")


def checkpoint_source(ckpt: ShardedCheckpoint, model: nn.Module, layers: nn.ModuleList):
    """A :class:`LayerStream` source reading layer ``i`` from the checkpoint, in float32."""

    def source(i: int, names: list[str]) -> dict[str, torch.Tensor]:
        prefix = layer_prefix(model, layers, i)
        state = ckpt.tensors([prefix + n for n in names], torch.float32)
        return {n: state[prefix + n] for n in names}

    return source


def load_shell(model: nn.Module, ckpt: ShardedCheckpoint, skip: str) -> None:
    """Every stored tensor of ``model`` outside ``skip`` (the decoder layers' prefix) read from ``ckpt``, float32."""
    names = [n for n in state_names(model) if not n.startswith(skip)]
    tied = _tied(model)
    materialise(model, ckpt.tensors([n for n in names if n not in tied], torch.float32))
    if tied:
        model.tie_weights()


def _tied(model: nn.Module) -> set[str]:
    # A tied LM head shares the embedding matrix: the checkpoint stores it once (or not under the head's name).
    cfg = model.config.get_text_config()
    return {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()


def empty_model(path: Path, config_cls, model_cls) -> nn.Module:
    """``model_cls`` built from ``path``'s config with no storage for its weights (buffers are real)."""
    from accelerate import init_empty_weights

    config = config_cls.from_pretrained(path)
    with init_empty_weights():
        model = model_cls._from_config(config, dtype=torch.float32)
    return model.eval()
