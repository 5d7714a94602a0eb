"""The inputs a decoder layer receives, captured by a pre-hook that ends the forward pass there."""

from __future__ import annotations

import torch
from torch import nn

from qavtp.errors import QavtpError


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted inputs are captured."""


@torch.no_grad()
def capture_inputs(model_call, layer: nn.Module) -> tuple[torch.Tensor, dict]:
    """Run ``model_call()`` until ``layer`` is reached; return its input hidden states and keyword arguments.

    The pass stops there, so layers after the wanted one cost nothing.
    """
    box: dict = {}

    def hook(module, args, kwargs):
        box["hidden"] = args[0] if args else kwargs["hidden_states"]
        box["kwargs"] = dict(kwargs)
        raise _Stop

    # First among the layer's pre-hooks: the pass ends before any other runs (a streamed layer's would read it).
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        model_call()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in box:
        raise QavtpError("the forward pass never reached the requested layer")
    return box["hidden"], box["kwargs"]
