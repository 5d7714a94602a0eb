"""One external-data file shared by several graphs: each weight is written once, every graph points at it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from qavtp.export.onnx_graph import Graph, Tensor

INLINE_MAX_BYTES = 1024  # scalars, shapes and small vectors stay inside the graph
ALIGN = 64  # every tensor starts on a 64-byte boundary (SIMD-friendly when memory-mapped)


class WeightStore:
    """Appends tensors to ``path``; a name placed twice (by a second graph) reuses the first copy."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.location = self.path.name  # graphs name the file relative to themselves, never absolutely
        self._fh = self.path.open("wb")
        self._index: dict[str, tuple[int, int, str]] = {}

    def place(self, name: str, t: Tensor) -> tuple[int, int]:
        digest = hashlib.sha1(t.raw).hexdigest()
        if name in self._index:
            offset, length, old = self._index[name]
            if old != digest:
                raise ValueError(f"weight {name} differs between graphs")
            return offset, length
        pos = self._fh.tell()
        pad = -pos % ALIGN
        self._fh.write(b"\0" * pad)
        offset = pos + pad
        self._fh.write(t.raw)
        self._index[name] = (offset, len(t.raw), digest)
        return offset, len(t.raw)

    def close(self) -> None:
        self._fh.close()

    @property
    def n_tensors(self) -> int:
        return len(self._index)


def _initializer(name: str, t: Tensor, store: WeightStore | None) -> TensorProto:
    if store is None or len(t.raw) <= INLINE_MAX_BYTES:
        return helper.make_tensor(name, t.data_type, t.dims, t.raw, raw=True)
    offset, length = store.place(name, t)
    tp = TensorProto(name=name, data_type=t.data_type, dims=t.dims)
    tp.data_location = TensorProto.EXTERNAL
    for k, v in (("location", store.location), ("offset", str(offset)), ("length", str(length))):
        entry = tp.external_data.add()
        entry.key, entry.value = k, v
    return tp


def to_model(g: Graph, store: WeightStore | None = None, doc: str = "") -> onnx.ModelProto:
    """The ModelProto of ``g``; initializers above 1 KiB go to ``store`` (inline if ``store`` is None)."""
    inits = [_initializer(n, t, store) for n, t in g.tensors.items()]
    graph = helper.make_graph(g.nodes, g.name, g.inputs, g.outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=g.opset_imports(), producer_name="qavtp", doc_string=doc)
    model.ir_version = 10 if g.opset <= 21 else 11  # opset 21 needs IR >= 10, opset 23 IR >= 11
    return model
