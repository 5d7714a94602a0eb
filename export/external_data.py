"""One external-data file shared by several graphs: each weight is written once, every graph points at it."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from qavtp.export.onnx_graph import Graph, Tensor

INLINE_MAX_BYTES = 1024  # scalars, shapes and small vectors stay inside the graph
ALIGN = 64  # every tensor starts on a 64-byte boundary (SIMD-friendly when memory-mapped)


class Placed:
    """An initializer already written to a :class:`WeightStore`: where its bytes are, not the bytes."""

    __slots__ = ("data_type", "dims", "offset", "length", "digest", "location")

    def __init__(self, t: Tensor, offset: int, location: str):
        self.data_type, self.dims, self.digest = t.data_type, t.dims, t.digest
        self.offset, self.length, self.location = offset, len(t.raw), location


class WeightStore:
    """Appends tensors to ``path`` as they come; a name placed twice (by a second graph) reuses the first copy.

    Pass :meth:`place` as a :class:`Graph`'s ``place``: the graph then keeps :class:`Placed` records, so building
    and writing an export holds one tensor's bytes at a time, not the model's.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.location = self.path.name  # graphs name the file relative to themselves, never absolutely
        self._fh = self.path.open("wb")
        self._index: dict[str, Placed] = {}

    def place(self, name: str, t: Tensor) -> Tensor | Placed:
        """``t`` written (once per name) and its :class:`Placed` record; a tensor of 1 KiB or less stays inline."""
        if len(t.raw) <= INLINE_MAX_BYTES:
            return t
        old = self._index.get(name)
        if old is not None:
            if old.digest != t.digest:
                raise ValueError(f"weight {name} differs between graphs")
            return old
        pos = self._fh.tell()
        pad = -pos % ALIGN
        self._fh.write(b"\0" * pad)
        placed = Placed(t, pos + pad, self.location)
        self._fh.write(t.raw)
        self._index[name] = placed
        return placed

    def close(self) -> None:
        self._fh.close()

    @property
    def n_tensors(self) -> int:
        return len(self._index)


def _initializer(name: str, t: Tensor | Placed, store: WeightStore | None) -> TensorProto:
    if isinstance(t, Tensor) and store is not None:
        t = store.place(name, t)
    if isinstance(t, Tensor):
        return helper.make_tensor(name, t.data_type, t.dims, t.raw, raw=True)
    tp = TensorProto(name=name, data_type=t.data_type, dims=t.dims)
    tp.data_location = TensorProto.EXTERNAL
    for k, v in (("location", t.location), ("offset", str(t.offset)), ("length", str(t.length))):
        entry = tp.external_data.add()
        entry.key, entry.value = k, v
    return tp


def to_model(g: Graph, store: WeightStore | None = None, doc: str = "") -> onnx.ModelProto:
    """The ModelProto of ``g``; initializers above 1 KiB go to ``store`` (inline if ``store`` is None), unless the
    graph placed them as it was built."""
    inits = [_initializer(n, t, store) for n, t in g.tensors.items()]
    graph = helper.make_graph(g.nodes, g.name, g.inputs, g.outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=g.opset_imports(), producer_name="qavtp", doc_string=doc)
    model.ir_version = 10 if g.opset <= 21 else 11  # opset 21 needs IR >= 10, opset 23 IR >= 11
    return model
