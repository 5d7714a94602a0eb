"""One buffer per layer's keys and values that a fused decode graph reads as its past and writes as its present.

onnxruntime's ``GroupQueryAttention`` writes a step's keys and values into the past tensor in place when the
present output is bound to the same memory (it compares the two pointers), so a decode step neither copies nor
reallocates the cache, unlike a graph whose present is ``Concat(past, new)``. The buffers hold ``capacity``
positions; the op reads the valid length from ``seqlens_k`` (the attention mask's length), and a step that would
not fit first moves the cache into buffers ``block`` positions longer.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVBuffers:
    """The past/present buffers ``[B, H_kv, capacity, hd]`` of every layer, filled from a prefill's presents."""

    def __init__(self, presents: dict[str, np.ndarray], n_layers: int, block: int):
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        self.names = [f"{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
        self.block = block
        self.length = int(presents["present.0.key"].shape[2])
        self._arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        self._allocate({n: presents[f"present.{n}"] for n in self.names}, self.length + block)

    @property
    def capacity(self) -> int:
        return int(self._arrays[self.names[0]].shape[2])

    def _allocate(self, current: dict[str, np.ndarray], capacity: int) -> None:
        for n, a in current.items():
            buf = np.zeros((*a.shape[:2], capacity, a.shape[3]), np.float32)
            buf[:, :, : self.length] = a[:, :, : self.length]
            self._arrays[n] = buf  # the OrtValue wraps this memory: keep it alive
            self.values[n] = ort.OrtValue.ortvalue_from_numpy(buf)

    def reserve(self, new_tokens: int) -> None:
        """Room for ``new_tokens`` more positions, growing by whole blocks (one copy) when they do not fit."""
        need = self.length + new_tokens
        if need > self.capacity:
            grown = self.capacity + self.block * -(-(need - self.capacity) // self.block)
            self._allocate({n: v.numpy() for n, v in self.values.items()}, grown)

    def bind(self, binding: ort.IOBinding) -> None:
        """Each layer's past input and present output on the same buffer."""
        for n, v in self.values.items():
            binding.bind_ortvalue_input(f"past.{n}", v)
            binding.bind_ortvalue_output(f"present.{n}", v)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def valid(self, name: str) -> np.ndarray:
        """A copy of the valid positions of ``name`` (``"0.key"``): what a copying graph's present would hold."""
        return self.values[name].numpy()[:, :, : self.length].copy()
