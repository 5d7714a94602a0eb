"""A tiny ONNX graph builder: named nodes, deduplicated constants and shared weights.

Graphs are written by hand (not traced) so that every quantization op is exactly the one we chose.
Weights are registered under stable names (the torch parameter path), so two graphs built from the same
model name the same tensors the same way and :mod:`qavtp.export.external_data` can store each of them once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 21
MS_DOMAIN = "com.microsoft"

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class Tensor:
    """An initializer's payload: ONNX element type, dims and the raw little-endian bytes ONNX stores."""

    __slots__ = ("data_type", "dims", "raw")

    def __init__(self, data_type: int, dims: tuple[int, ...], raw: bytes):
        self.data_type, self.dims, self.raw = data_type, tuple(int(d) for d in dims), raw

    @property
    def digest(self) -> tuple:
        """What two registrations of one name must agree on (a placed tensor keeps only this)."""
        return self.data_type, self.dims, hashlib.sha1(self.raw).hexdigest()

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> Tensor:
        a = np.asarray(a, order="C")  # (ascontiguousarray would turn a scalar into shape [1])
        if a.dtype not in _NP_TO_ONNX:
            raise TypeError(f"no ONNX type for numpy dtype {a.dtype}")
        return cls(_NP_TO_ONNX[a.dtype], a.shape, a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


class Graph:
    """Nodes, inputs, outputs and initializers of one ONNX graph under construction.

    ``place(name, tensor)``, when given, takes each initializer's bytes as it is registered (writing them to an
    external-data file) and returns what the graph keeps instead: so a 7B graph is built without holding its
    weights (:class:`qavtp.export.external_data.WeightStore`).
    """

    def __init__(self, name: str, place: Callable[[str, Tensor], object] | None = None):
        self.name = name
        self.place = place
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.tensors: dict[str, Tensor] = {}
        self._consts: dict[tuple, str] = {}
        self.memo: dict[tuple, str] = {}  # subgraphs built once per input (fakequant.fake_quant)
        self._count = 0
        self.uses_ms_domain = False
        self.scope = "graph"  # node-name prefix: per-stage timings come from onnxruntime's profile
        self.opset = OPSET  # raised by ops of a later opset (``needs_opset``)

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(
        self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs
    ) -> str | list[str]:
        """Add a node; returns its output name (or names when ``outputs`` asks for several)."""
        names = outputs if isinstance(outputs, list) else [self.fresh(op_type) for _ in range(outputs)]
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), names, name=f"{self.scope}/{self.fresh(op_type)}", domain=domain, **attrs
            )
        )
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """A constant initializer (deduplicated by value), e.g. a scalar, a shape or a Hadamard matrix."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            # Named by content: another graph's constant of the same name holds the same bytes, so the two
            # graphs can share one copy in the external weights file.
            name = "const_" + hashlib.sha1(repr(key[:2]).encode() + key[2]).hexdigest()[:16]
            self.tensors[name] = self._kept(name, Tensor.from_numpy(a))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, t: Tensor | np.ndarray) -> str:
        """A named weight; registering the same name twice must give the same bytes."""
        t = t if isinstance(t, Tensor) else Tensor.from_numpy(t)
        old = self.tensors.get(name)
        if old is not None and old.digest != t.digest:
            raise ValueError(f"weight {name} registered twice with different contents")
        self.tensors[name] = self._kept(name, t)
        return name

    def _kept(self, name: str, t: Tensor):
        return t if self.place is None else self.place(name, t)

    def loop(
        self,
        trip_count: str,
        states: list[tuple[str, int]],
        body: Callable[[str, list[str]], tuple[list[str], list[str]]],
        scan_types: list[int],
    ) -> list[str]:
        """An ONNX ``Loop`` of ``trip_count`` iterations: the final states, then the stacked scan outputs.

        ``states`` are the initial values with their element types; ``body(iteration, states)`` adds the body's
        nodes to this graph (its constants stay outer initializers, which a body may read) and returns the new
        states and the per-iteration scan outputs (of ``scan_types``).
        """
        outer, self.nodes = self.nodes, []
        it, cond = self.fresh("iteration"), self.fresh("cond")
        state_in = [self.fresh("state") for _ in states]
        new_states, scans = body(it, state_in)
        # A body output must be a value the body computes, not one of its inputs.
        new_states = [self.op("Identity", s) if s in state_in else s for s in new_states]
        cond_out = self.op("Identity", cond)
        vi = helper.make_tensor_value_info
        inputs = [vi(it, TensorProto.INT64, []), vi(cond, TensorProto.BOOL, [])]
        inputs += [vi(n, t, None) for n, (_, t) in zip(state_in, states, strict=True)]
        outputs = [vi(cond_out, TensorProto.BOOL, [])]
        outputs += [vi(n, t, None) for n, (_, t) in zip(new_states, states, strict=True)]
        outputs += [vi(n, t, None) for n, t in zip(scans, scan_types, strict=True)]
        graph = helper.make_graph(self.nodes, self.fresh("loop_body"), inputs, outputs)
        self.nodes = outer
        # An explicit condition: onnx.reference runs no iteration when the optional input is left out.
        keep_going = self.const(True, np.bool_)
        out = self.op(
            "Loop", trip_count, keep_going, *[s for s, _ in states], outputs=len(states) + len(scans), body=graph
        )
        return out if isinstance(out, list) else [out]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        """Expose ``value`` as graph output ``name`` (an Identity renames it)."""
        self.op("Identity", value, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def needs_opset(self, version: int) -> None:
        self.opset = max(self.opset, version)

    def opset_imports(self) -> list[onnx.OperatorSetIdProto]:
        ops = [helper.make_opsetid("", self.opset)]
        if self.uses_ms_domain:
            ops.append(helper.make_opsetid(MS_DOMAIN, 1))
        return ops
