"""QuaRot-style function-preserving rotations of the adapter's LLM (the vision tower is left alone).

Offline (folded into weights, no runtime cost):
  * RMSNorm scales folded into the linears that read the norm (:func:`fuse_layer_norms`);
  * a randomized Hadamard ``Q`` on the residual stream: every weight that reads the stream becomes
    ``W Q``, every weight that writes it ``Q^T W`` (embeddings, projector output, o_proj, down_proj,
    lm_head);
  * a per-head Hadamard on the value path: ``v_proj`` rotates each head's values, ``o_proj``
    rotates them back (attention mixes tokens, not channels, so the fold is exact).
Online (one matmul at runtime): a Hadamard of the intermediate size before ``down_proj``, whose
inverse is folded into ``down_proj``'s weight; optionally (``online_o_proj``) one of the attention
width before ``o_proj``, which mixes the heads as QuaRot's cross-head Hadamard does (its head count,
9 on SmolLM2, has no Hadamard matrix of its own, the full width 576 = 12 * 12 * 4 has). Each is an
:class:`OnlineHadamardLinear` module, so
the torch forward and an ONNX trace both carry it.

All folds run in float64 and are cast back to the weights' dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from qavtp.calibrate.hadamard import apply_hadamard_factored, hadamard_matrix, random_hadamard
from qavtp.device import visiting
from qavtp.errors import QavtpError
from qavtp.models.base import Adapter


class OnlineHadamardLinear(nn.Module):
    """``linear(x @ H)``: a linear layer whose input is rotated at runtime.

    ``H`` is a non-persistent buffer: the state dict holds only ``linear``'s weights, and the
    matrix is rebuilt from its size (see :func:`install_online_transforms`).
    """

    def __init__(self, hadamard: torch.Tensor, linear: nn.Linear):
        super().__init__()
        if hadamard.shape != (linear.in_features, linear.in_features):
            raise QavtpError(
                f"online Hadamard of shape {tuple(hadamard.shape)} does not match in_features={linear.in_features}"
            )
        self.linear = linear
        self.register_buffer("hadamard", hadamard.to(torch.float32), persistent=False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through the Kronecker factors: the same matrix, n (a + b) instead of n^2 operations per token.
        return self.linear(apply_hadamard_factored(x, self.in_features))


def _linear(module: nn.Module) -> nn.Linear:
    return module.linear if isinstance(module, OnlineHadamardLinear) else module


def norm_groups(adapter: Adapter) -> list[tuple[str, nn.Module, dict[str, nn.Linear]]]:
    """Each RMSNorm with the linears that read its output: ``(norm name, norm, {linear name: linear})``.

    Names are relative to the decoder layer list (``layers.3.input_layernorm``), as in the stats.
    """
    groups = []
    for i, layer in enumerate(adapter.decoder_layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}"
        groups.append(
            (
                f"{p}.input_layernorm",
                layer.input_layernorm,
                {f"{p}.self_attn.{n}": getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")},
            )
        )
        groups.append(
            (
                f"{p}.post_attention_layernorm",
                layer.post_attention_layernorm,
                {f"{p}.mlp.{n}": _linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj")},
            )
        )
    return groups


def _check_rmsnorm(name: str, norm: nn.Module) -> None:
    # A LayerNorm would also need its mean subtraction and bias handled; only RMSNorm is folded here.
    if getattr(norm, "bias", None) is not None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise QavtpError(f"{name} is not an RMSNorm with a weight and no bias ({type(norm).__name__})")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def untie_lm_head(adapter: Adapter) -> bool:
    """Give lm_head its own copy of a tied embedding matrix; True if it was tied."""
    head, emb = adapter.lm_head, adapter.embed_tokens
    if head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model = adapter.model
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    # transformers caches the tied-key mapping at init; left in place, save/load or tie_weights()
    # would tie the (now different) matrices again.
    for m in model.modules():
        keys = getattr(m, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            m.all_tied_weights_keys = {k: v for k, v in keys.items() if "lm_head" not in k}
    return True


@torch.no_grad()
def fuse_layer_norms(adapter: Adapter) -> bool:
    """Fold every RMSNorm weight into the linears that read it and set the norm weights to 1.

    ``input_layernorm`` goes into q/k/v, ``post_attention_layernorm`` into gate/up and the final
    norm into lm_head, which is untied from the embeddings first (they get different transforms
    later). Idempotent. Returns whether lm_head had to be untied.
    """
    untied = untie_lm_head(adapter)
    groups = norm_groups(adapter) + [("norm", adapter.final_norm, {"lm_head": adapter.lm_head})]
    for name, norm, linears in groups:
        _check_rmsnorm(name, norm)
        g = norm.weight.detach().double()
        for lin in linears.values():
            _set(lin.weight, lin.weight.double() * g[None, :])
        norm.weight.fill_(1.0)
    return untied


def _projector_output(adapter: Adapter, hidden: int) -> nn.Linear:
    """The projector's last linear: its output enters the residual stream as the visual tokens."""
    proj = getattr(getattr(adapter.model, "model", adapter.model), "multi_modal_projector", None)
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)] if proj is not None else []
    if not linears or linears[-1].out_features != hidden:
        raise QavtpError(
            f"cannot find the multimodal projector's output linear (out_features={hidden}) in "
            f"{type(adapter.model).__name__}"
        )
    return linears[-1]


def _head_dim(adapter: Adapter) -> int:
    attn = adapter.decoder_layers[0].self_attn
    cfg = adapter.model.config.get_text_config()
    d = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    return int(d or cfg.hidden_size // cfg.num_attention_heads)


def _rotate_output(lin: nn.Linear, q: torch.Tensor) -> None:
    """``y -> y Q`` for a linear that writes into the rotated space: ``W <- Q^T W``, ``b <- b Q``."""
    _set(lin.weight, q.T @ lin.weight.double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.double() @ q)


def _rotate_input(lin: nn.Linear | nn.Embedding, q: torch.Tensor) -> None:
    """Reads a rotated input ``x Q``: ``W <- W Q`` keeps ``x W^T`` unchanged (also embedding rows)."""
    _set(lin.weight, lin.weight.double() @ q)


def _per_head(h: torch.Tensor, heads: int) -> torch.Tensor:
    return torch.block_diag(*[h] * heads)


@torch.no_grad()
def rotate_model(
    adapter: Adapter, seed: int = 0, online_o_proj: bool = False, device: torch.device | None = None
) -> dict:
    """Apply the QuaRot rotations in place (norms are fused first); returns a JSON-able description.

    The description is what an artifact stores: the seed and sizes rebuild every matrix, and
    ``online`` lists the modules that :func:`install_online_transforms` must wrap again. With ``device``
    each rotated module visits it for its float64 products (:mod:`qavtp.device`).
    """
    layers = adapter.decoder_layers
    if any(isinstance(layer.mlp.down_proj, OnlineHadamardLinear) for layer in layers):
        raise QavtpError("model is already rotated (down_proj carries an online Hadamard)")
    untied = fuse_layer_norms(adapter)

    emb = adapter.embed_tokens
    hidden = emb.weight.shape[1]
    intermediate = _linear(layers[0].mlp.down_proj).in_features
    head_dim = _head_dim(adapter)
    dev = device or emb.weight.device
    q = random_hadamard(hidden, seed).to(dev)
    h_int = hadamard_matrix(intermediate).to(dev)
    h_head = hadamard_matrix(head_dim).to(dev)
    width = layers[0].self_attn.o_proj.in_features
    h_attn = hadamard_matrix(width).to(dev) if online_o_proj else None

    with visiting(emb, device):
        _rotate_input(emb, q.to(emb.weight.device))
    with visiting(_projector_output(adapter, hidden), device) as proj:
        _rotate_output(proj, q.to(proj.weight.device))
    online = []
    for i, layer in enumerate(layers):
        with visiting(layer, device):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _rotate_input(lin, q.to(lin.weight.device))
            # Per-head Hadamard on the values: each head's value vector becomes v H and, since the
            # attention output of a head is a mix of its values, o_proj sees o H per head and undoes it.
            kv_heads = attn.v_proj.out_features // head_dim
            heads = attn.o_proj.in_features // head_dim
            hv = h_head.to(attn.v_proj.weight.device)
            _rotate_output(attn.v_proj, _per_head(hv, kv_heads))
            _rotate_input(attn.o_proj, _per_head(hv, heads))
            _rotate_output(attn.o_proj, q.to(attn.o_proj.weight.device))
            if h_attn is not None:
                ha = h_attn.to(attn.o_proj.weight.device)
                _rotate_input(attn.o_proj, ha)
                attn.o_proj = OnlineHadamardLinear(ha, attn.o_proj)
                online.append({"module": f"layers.{i}.self_attn.o_proj", "transform": "hadamard", "size": width})
            down = mlp.down_proj
            hi = h_int.to(down.weight.device)
            _rotate_input(down, hi)  # W H: the online x -> x H at the input cancels it
            _rotate_output(down, q.to(down.weight.device))
            mlp.down_proj = OnlineHadamardLinear(hi, down)
            online.append({"module": f"layers.{i}.mlp.down_proj", "transform": "hadamard", "size": intermediate})
    with visiting(adapter.lm_head, device) as head:
        _rotate_input(head, q.to(head.weight.device))
    return {
        "seed": int(seed),
        "hidden": int(hidden),
        "intermediate": int(intermediate),
        "head_dim": int(head_dim),
        "untied_lm_head": bool(untied),
        "online": online,
    }


def _get_submodule(adapter: Adapter, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    if not parent_name.startswith("layers."):
        raise QavtpError(f"online transform on {name!r}: only modules under the decoder layers are supported")
    try:
        parent = adapter.decoder_layers.get_submodule(parent_name[len("layers.") :])
    except AttributeError:
        raise QavtpError(f"online transform on {name!r}: no such module in the model") from None
    return parent, attr


def install_online_transforms(adapter: Adapter, description: dict) -> None:
    """Wrap the modules that ``description["online"]`` names, changing no weights.

    For loading an artifact: build the model, untie lm_head if the description says so, install
    the wrappers, then load the rotated state dict (whose keys then read ``...down_proj.linear.weight``).
    """
    if description.get("untied_lm_head"):
        untie_lm_head(adapter)
    for entry in description.get("online", []):
        if entry.get("transform") != "hadamard":
            raise QavtpError(f"unknown online transform {entry.get('transform')!r} on {entry.get('module')!r}")
        parent, attr = _get_submodule(adapter, entry["module"])
        mod = getattr(parent, attr)
        if isinstance(mod, OnlineHadamardLinear):
            continue
        h = hadamard_matrix(int(entry["size"])).to(mod.weight.device)
        setattr(parent, attr, OnlineHadamardLinear(h, mod))
