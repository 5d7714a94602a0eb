"""Per-visual-token scores for pruning: semantic relevance, quantization sensitivity, ablation metrics, fusion.

Every scorer returns a float tensor ``[B, N]`` (N visual tokens per image); higher means more worth keeping,
except that the sensitivity scores only say how *sensitive* a token is: whether sensitive tokens are kept
or dropped is the ``direction`` of :func:`fuse`.

Attention scores are computed explicitly for the one scoring layer, from that layer's input hidden states,
so they work whatever attention kernel (eager, SDPA, flash) the model itself runs: those kernels never
materialise the attention weights that ``output_attentions`` would need.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from qavtp.calibrate.quantizers import QuantLinear, QuantSpec, quant_error
from qavtp.diversity import check_theta, divprune_order, dpp_order, order_scores, relevance_quality
from qavtp.errors import QavtpError
from qavtp.models.capture import capture_inputs
from qavtp.prompting import position_ids as left_padded_positions

SCORERS: dict[str, str] = {
    "semantic": "attention of the last prompt token to each visual token at decoder layer K (FastV)",
    "cls": "[CLS] -> patch attention in the vision tower (FasterVLM / VisionZip)",
    "qerror": "simulated group-wise activation quantization error of each visual token",
    "outlier": "outlier intensity: channel range, or max |x| over the calibrated median channel absmax",
    "hybrid": "beta * norm(qerror) + (1 - beta) * norm(outlier)",
    "qavtp": "alpha * norm(semantic) + (1 - alpha) * direction * norm(hybrid), learned by calibration",
    "qapruner": "the paper's recipe: alpha 0.5, beta 0.5, keep sensitive, min-max, absolute error, channel range",
    "linf": "L-infinity norm of each visual token",
    "l1": "L1 norm of each visual token",
    "l2": "L2 norm of each visual token",
    "variance": "variance over the channels of each visual token",
    "random": "uniform random scores (seeded)",
    "divprune": "max-min diversity of the visual tokens, greedy (DivPrune)",
    "cdpruner": "conditional DPP: similarity weighted by relevance to the prompt's text, theta 0.5 (CDPruner)",
    "qavtp-dpp": "a DPP whose quality is the learned qavtp score: quality x diversity (--relevance-weight theta)",
}
CDPRUNER_THETA = 0.5  # the relevance weight of CDPruner's released code
# The scorers that read an artifact's learned fusion weights.
LEARNED_SCORERS = ("qavtp", "qavtp-dpp")
# How the fused score picks tokens: top-k, or as the quality of a DPP over the tokens' similarity.
SELECTIONS = ("topk", "dpp")

NORMS = ("minmax", "zscore")
OUTLIERS = ("range", "linf")
# Relevance terms: text (the last prompt token's attention at layer 0), cls (the vision tower's [CLS] attention),
# text-lN (the attention at decoder layer N on the full prompt; FastV scores at N = 2), still pruned before the LLM.
FASTV_LAYER = 2


def semantic_layer(kind: str) -> int:
    """The decoder layer whose attention a relevance term reads: N for ``text-lN``, 0 for ``text``."""
    if kind.startswith("text-l") and kind[6:].isdigit():
        return int(kind[6:])
    if kind in ("text", "cls"):
        return 0
    raise QavtpError(f"unknown semantic score {kind!r}; valid: text, cls, text-l<layer> (e.g. text-l{FASTV_LAYER})")


def check_scorer(name: str) -> str:
    if name not in SCORERS:
        raise QavtpError(f"unknown scorer {name!r}; valid: {', '.join(SCORERS)}")
    return name


# ------------------------------------------------------------------------------------------- helpers


def gather_visual(hidden: Tensor, visual_mask: Tensor) -> Tensor:
    """The visual positions of ``hidden [B, L, D]`` as ``[B, N, D]`` (every sample must hold N of them)."""
    counts = visual_mask.sum(1)
    if counts.numel() == 0 or int(counts.min()) == 0:
        raise QavtpError("every sample needs visual tokens to score, but a sample has none")
    if int(counts.max()) != int(counts.min()):
        raise QavtpError(f"samples hold different numbers of visual tokens: {sorted(set(counts.tolist()))}")
    return hidden[visual_mask].reshape(hidden.shape[0], int(counts[0]), *hidden.shape[2:])


def check_layer(n_layers: int, layer_idx: int, what: str = "decoder") -> int:
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n_layers:
        raise QavtpError(f"layer K={layer_idx} is beyond the model's {n_layers} {what} layers")
    return layer_idx


def model_inputs(enc) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values")
    return {k: enc[k] for k in keys if k in enc and enc[k] is not None}


@torch.no_grad()
def hidden_states_at(adapter, enc, layer_idx: int) -> Tensor:
    """Hidden states ``[B, L, D]`` entering decoder layer ``layer_idx`` (0: the embeddings, visual tokens included)."""
    layers = adapter.decoder_layers
    k = check_layer(len(layers), layer_idx)
    # No KV cache: nothing after layer K runs, and a cache would only hold memory.
    hidden, _ = capture_inputs(lambda: adapter.model(**model_inputs(enc), use_cache=False), layers[k])
    return hidden


def _rope_fn(attn: nn.Module):
    """The architecture's own ``apply_rotary_pos_emb`` (from the attention module's source), else LLaMA's."""
    mod = importlib.import_module(type(attn).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


# ----------------------------------------------------------------------------------------- semantic


def _weights_only(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear(x)`` without its activation quantizer, if it has one."""
    return linear.weights_only(x) if isinstance(linear, QuantLinear) else linear(x)


@torch.no_grad()
def text_attention(
    adapter,
    hidden_in: Tensor,
    layer_idx: int,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    visual_mask: Tensor,
) -> Tensor:
    """Attention of the last prompt token to each visual token at decoder layer K, averaged over heads: ``[B, N]``.

    ``hidden_in`` is the input of layer K (see :func:`hidden_states_at`); ``attention_mask`` the ``[B, L]``
    padding mask; ``position_ids`` ``[B, L]``. Only the last query row is computed: it is all FastV uses.

    The query and key projections use the layer's (possibly quantized) weights on unquantized activations: a
    4-bit activation rounding that flips between torch and an ONNX runtime (the 4-bit embedding rows make exact
    ties common) would otherwise change which tokens are kept.
    """
    layers = adapter.decoder_layers
    with adapter.resident(check_layer(len(layers), layer_idx)) as layer:  # a streamed model reads the layer now
        return _last_token_attention(adapter, layer, hidden_in, visual_mask, attention_mask, position_ids)


def _last_token_attention(adapter, layer, hidden_in, visual_mask, attention_mask, position_ids) -> Tensor:
    attn = layer.self_attn
    B, L, _ = hidden_in.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long, device=hidden_in.device)
    if position_ids is None:
        position_ids = left_padded_positions(attention_mask)
    h = layer.input_layernorm(hidden_in)
    head_dim = attn.head_dim
    q = _weights_only(attn.q_proj, h[:, -1:]).view(B, 1, -1, head_dim).transpose(1, 2)  # [B, H, 1, hd]
    k = _weights_only(attn.k_proj, h).view(B, L, -1, head_dim).transpose(1, 2)  # [B, H_kv, L, hd]
    # Some architectures (Qwen3, OLMo2) normalise q and k per head before RoPE.
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = adapter.language_model.rotary_emb(h, position_ids)
    rope = _rope_fn(attn)
    # Query and keys sit at different positions, so each gets its own rotation (the function rotates two
    # tensors with the same phases; the second output is discarded).
    q = rope(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rope(k, k, cos, sin)[0]
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # GQA: each KV head serves n_rep query heads
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * scaling  # [B, H, L]
    # The last token may see every earlier position (causal), but never padding.
    logits = logits.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
    probs = logits.softmax(-1).mean(1)  # [B, L]
    return gather_visual(probs, visual_mask)


def _vision_tower(adapter) -> nn.Module:
    tower = getattr(adapter, "vision_tower", None)
    if tower is None:
        inner = getattr(adapter.model, "model", adapter.model)
        tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise QavtpError(f"{type(adapter).__name__} exposes no vision tower for [CLS] attention")
    return tower


@torch.no_grad()
def cls_attention(adapter, pixel_values: Tensor, layer: int = -2) -> Tensor:
    """[CLS] -> patch attention at vision-tower encoder layer ``layer``, averaged over heads: ``[B, N_patches]``."""
    tower = _vision_tower(adapter)
    body = getattr(tower, "vision_model", tower)  # transformers 4.x nests a vision_model; 5.x does not
    enc_layers = body.encoder.layers
    n = len(enc_layers)
    idx = layer + n if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0 else layer
    check_layer(n, idx, "vision-tower")
    block = enc_layers[idx]
    dtype = next(tower.parameters()).dtype
    hidden, kwargs = capture_inputs(lambda: tower(pixel_values.to(dtype)), block)
    attn = block.self_attn
    h = block.layer_norm1(hidden)
    B, T, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(h[:, :1]).view(B, 1, heads, head_dim).transpose(1, 2)  # the [CLS] query only
    k = attn.k_proj(h).view(B, T, heads, head_dim).transpose(1, 2)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scale  # [B, heads, T]
    mask = kwargs.get("attention_mask")
    if mask is not None:  # CLIP's vision tower passes none; an additive mask would apply here
        logits = logits + mask[:, :, 0].float()
    return logits.softmax(-1).mean(1)[:, 1:]


# -------------------------------------------------------------------------------------- sensitivity


def quant_error_score(X: Tensor, spec: QuantSpec, relative: bool = True) -> Tensor:
    """Per-token error of the deployed activation quantizer on ``X [B, N, D]``: ``[B, N]``."""
    return quant_error(X, spec, relative=relative)


def outlier_intensity(X: Tensor, channel_absmax: Tensor | None = None) -> Tensor:
    """How extreme each token is: ``max_c |x_c| / median(channel_absmax)`` given calibration statistics,
    else the paper's channel range ``max_c x_c - min_c x_c``."""
    Xf = X.float()
    if channel_absmax is None:
        return Xf.amax(-1) - Xf.amin(-1)
    if channel_absmax.shape != (X.shape[-1],):
        raise QavtpError(f"channel absmax has shape {tuple(channel_absmax.shape)}, expected ({X.shape[-1]},)")
    med = channel_absmax.float().median().clamp_min(1e-12)
    return Xf.abs().amax(-1) / med.to(Xf.device)


def hybrid_sensitivity(eq: Tensor, o: Tensor, beta: float, norm: str = "minmax") -> Tensor:
    """``beta * norm(eq) + (1 - beta) * norm(o)``."""
    _check_unit("beta", beta)
    return beta * normalize(eq, norm) + (1 - beta) * normalize(o, norm)


# ------------------------------------------------------------------------------------------ ablation


def linf(X: Tensor) -> Tensor:
    return X.float().abs().amax(-1)


def l1(X: Tensor) -> Tensor:
    return X.float().abs().sum(-1)


def l2(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X.float(), dim=-1)


def variance(X: Tensor) -> Tensor:
    return X.float().var(-1, unbiased=False)


def random_scores(shape: tuple[int, ...] | torch.Size, seed: int = 0) -> Tensor:
    # A private generator: the global RNG stays untouched and the same seed gives the same scores.
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen)


# ----------------------------------------------------------------------------------- normalise, fuse


def normalize(s: Tensor, kind: str = "minmax") -> Tensor:
    """Normalise scores over the N tokens of each image (the last dimension); a constant row becomes zeros."""
    s = s.float()
    if kind == "minmax":
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(s))
    if kind == "zscore":
        mean, std = s.mean(-1, keepdim=True), s.std(-1, keepdim=True, unbiased=False)
        return torch.where(std > 0, (s - mean) / torch.where(std > 0, std, 1.0), torch.zeros_like(s))
    raise QavtpError(f"unknown normalisation {kind!r}; valid: {', '.join(NORMS)}")


def fuse(sem: Tensor, sens: Tensor, alpha: float, direction: int = 1, norm: str = "minmax") -> Tensor:
    """``alpha * norm(sem) + (1 - alpha) * direction * norm(sens)``.

    ``direction = +1`` keeps sensitive (outlier) tokens, as the paper does; ``-1`` prefers robust ones.
    """
    _check_unit("alpha", alpha)
    if direction not in (1, -1):
        raise QavtpError(f"direction must be +1 (keep sensitive tokens) or -1 (keep robust ones), got {direction}")
    if sem.shape != sens.shape:
        raise QavtpError(f"semantic scores {tuple(sem.shape)} and sensitivity {tuple(sens.shape)} differ in shape")
    return alpha * normalize(sem, norm) + (1 - alpha) * direction * normalize(sens, norm)


def _check_unit(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise QavtpError(f"{name} must lie in [0, 1], got {v}")


# ------------------------------------------------------------------------------------ fusion params


@dataclass(frozen=True)
class FusionParams:
    """Everything the ``qavtp`` scorer needs besides the model: the learned fusion of one retention ratio.

    ``outlier`` is the outlier intensity: ``range`` (max - min over channels, the paper's) or ``linf``
    (max |x|). Dividing by a calibrated channel statistic would change nothing here: every term is
    normalised per image, which cancels any constant factor. ``qspec`` is the simulated quantizer of
    the error term (the deployed activation quantizer, or the paper's INT4 g128). ``semantic`` is the
    relevance term: ``text`` (last prompt token's attention at layer 0), ``cls`` (vision [CLS] attention) or
    ``text-lN`` (the attention at decoder layer N, computed on the full prompt by layers 0..N-1). ``select`` is
    how the fused score picks tokens: ``topk``, or ``dpp``: the score (min-max normalised) becomes the quality
    ``exp(theta r / (2 (1 - theta)))`` of CDPruner's kernel ``diag(q) S diag(q)`` over the tokens' cosine
    similarity, so the kept set trades the fused score against redundancy (``theta`` towards 1: the score alone).
    """

    alpha: float = 0.5
    beta: float = 0.5
    direction: int = 1
    norm: str = "minmax"
    outlier: str = "range"
    relative: bool = False
    qspec: dict = field(default_factory=lambda: QuantSpec(4, True, 128).to_dict())
    semantic: str = "text"
    select: str = "topk"
    theta: float = CDPRUNER_THETA

    def __post_init__(self) -> None:
        _check_unit("alpha", self.alpha)
        _check_unit("beta", self.beta)
        if self.direction not in (1, -1):
            raise QavtpError(f"direction must be +1 (keep sensitive) or -1 (keep robust), got {self.direction}")
        if self.norm not in NORMS:
            raise QavtpError(f"unknown normalisation {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.outlier not in OUTLIERS:
            raise QavtpError(f"unknown outlier intensity {self.outlier!r}; valid: {', '.join(OUTLIERS)}")
        semantic_layer(self.semantic)
        QuantSpec.from_dict(self.qspec)
        if self.select not in SELECTIONS:
            raise QavtpError(f"unknown token selection {self.select!r}; valid: {', '.join(SELECTIONS)}")
        check_theta(self.theta)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.from_dict(self.qspec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FusionParams:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise QavtpError(f"unknown fusion parameters {sorted(unknown)}")
        return cls(**d)


def paper_group(dim: int, preferred: int = 128) -> int:
    """The paper's simulation group (128), or the largest power of two below it that divides ``dim``."""
    g = preferred
    while g > 1 and dim % g:
        g //= 2
    return g


def qapruner_params(dim: int) -> FusionParams:
    """The paper's recipe as a preset (its alpha is not published: 0.5)."""
    return FusionParams(0.5, 0.5, 1, "minmax", "range", False, QuantSpec(4, True, paper_group(dim)).to_dict())


def sensitivity_terms(X: Tensor, p: FusionParams) -> tuple[Tensor, Tensor]:
    """Quantization error and outlier intensity ``[B, N]`` of the visual tokens ``X [B, N, D]``."""
    eq = quant_error_score(X, p.spec, relative=p.relative)
    o = outlier_intensity(X) if p.outlier == "range" else linf(X)
    return eq, o


def fused_scores(sem: Tensor, X: Tensor, p: FusionParams) -> Tensor:
    """The qavtp score ``[B, N]``: ``alpha norm(sem) + (1 - alpha) direction norm(beta norm(eq) + (1 - beta) norm(o))``.

    This is the formula the ONNX pruning subgraph reproduces.
    """
    eq, o = sensitivity_terms(X, p)
    return fuse(sem, hybrid_sensitivity(eq, o, p.beta, p.norm), p.alpha, p.direction, p.norm)


def selection_scores(sem: Tensor, X: Tensor, p: FusionParams) -> Tensor:
    """What ``select_tokens`` ranks under ``p``: the fused score (top-k), or the greedy order of the DPP whose
    quality the fused score is (``p.select == "dpp"``), as ranks."""
    s = fused_scores(sem, X, p)
    return s if p.select == "topk" else order_scores(dpp_order(X, relevance_quality(s, p.theta)))


def as_dpp(p: FusionParams, theta: float | None = None) -> FusionParams:
    """``p`` with DPP selection (scorer ``qavtp-dpp``): ``theta`` if given, else the learned one."""
    return FusionParams(**{**p.to_dict(), "select": "dpp", "theta": p.theta if theta is None else theta})


def available_semantics(adapter) -> tuple[str, ...]:
    """The relevance terms this model offers: [CLS] attention needs a penultimate vision-tower layer."""
    try:
        tower = _vision_tower(adapter)
        body = getattr(tower, "vision_model", tower)
        n = len(body.encoder.layers)
    except (QavtpError, AttributeError):
        n = 0
    deeper = min(FASTV_LAYER, len(adapter.decoder_layers) - 1)
    return ("text", *(("cls",) if n >= 2 else ()), *((f"text-l{deeper}",) if deeper > 0 else ()))


def semantic_scores(adapter, enc, hidden: Tensor, visual_mask: Tensor, kind: str = "text", layer: int = 0) -> Tensor:
    """The relevance term ``[B, N]``: text attention at layer K (``hidden`` enters it), vision [CLS] attention, or
    (``text-lN``, pruning before the LLM) text attention at layer N on the full prompt."""
    if kind == "cls":
        return cls_attention(adapter, enc["pixel_values"])
    deeper = semantic_layer(kind)
    if deeper:
        if layer:
            raise QavtpError(f"relevance term {kind!r} is defined for pruning before the LLM (K = 0), not K = {layer}")
        hidden, layer = hidden_states_at(adapter, enc, deeper), deeper
    return text_attention(adapter, hidden, layer, enc["attention_mask"], enc.get("position_ids"), visual_mask)


_NORMS = {"linf": linf, "l1": l1, "l2": l2, "variance": variance}


def score_tokens(
    name: str,
    adapter,
    enc,
    embeds: Tensor,
    visual_mask: Tensor,
    spec: QuantSpec | None = None,
    seed: int = 0,
    fusion: FusionParams | None = None,
    layer: int = 0,
    theta: float | None = None,
) -> Tensor:
    """Scores ``[B, N]`` of the visual tokens by scorer ``name`` at the pruning point, layer K = ``layer``.

    ``embeds`` are the hidden states entering layer K (for K = 0 the input embeddings with the visual tokens
    in place, ``adapter.embed``); ``spec`` the deployed activation quantizer (for ``qerror``); ``fusion``
    the learned parameters (for ``qavtp``), learned for pruning at layer 0; ``theta`` the relevance weight of
    ``cdpruner`` (default 0.5) and ``qavtp-dpp`` (default: the learned one, else 0.5).
    """
    if name in ("qavtp", "qapruner", "qavtp-dpp") and layer != 0:
        raise QavtpError(f"scorer {name!r} is learned for pruning before the LLM (K = 0), not at K = {layer}")
    check_scorer(name)
    X = gather_visual(embeds, visual_mask)
    if name == "semantic":
        return semantic_scores(adapter, enc, embeds, visual_mask, "text", layer)
    if name == "qapruner":
        p = qapruner_params(X.shape[-1])
        return fused_scores(semantic_scores(adapter, enc, embeds, visual_mask, p.semantic), X, p)
    if name in LEARNED_SCORERS:
        if fusion is None:
            raise QavtpError(f"scorer {name!r} needs fusion weights: calibrate with --retain, then pass --artifact")
        p = fusion if name == "qavtp" else as_dpp(fusion, theta)
        return selection_scores(semantic_scores(adapter, enc, embeds, visual_mask, p.semantic), X, p)
    if name == "cls":
        return cls_attention(adapter, enc["pixel_values"])
    if name in _NORMS:
        return _NORMS[name](X)
    if name in ("qerror", "outlier", "hybrid"):
        p = fusion or qapruner_params(X.shape[-1])
        if spec is not None:
            p = FusionParams(**{**p.to_dict(), "qspec": spec.to_dict()})
        eq, o = sensitivity_terms(X, p)
        value = eq if name == "qerror" else o if name == "outlier" else hybrid_sensitivity(eq, o, p.beta, p.norm)
        # With learned fusion weights, a sensitivity term alone keeps the tokens the learned direction favours.
        return value * (fusion.direction if fusion is not None else 1)
    if name == "random":
        return random_scores(X.shape[:2], seed)
    if name == "divprune":
        return order_scores(divprune_order(X))
    if name == "cdpruner":
        relevance = text_relevance(embeds, visual_mask, enc.get("attention_mask"))
        return order_scores(dpp_order(X, relevance_quality(relevance, CDPRUNER_THETA if theta is None else theta)))
    raise QavtpError(f"no scoring rule for {name!r}")


def text_relevance(embeds: Tensor, visual_mask: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Relevance ``[B, N]`` of each visual token to the prompt: its mean cosine similarity to the sample's real text
    tokens at the pruning point (the LLM's embedding space stands in for CDPruner's CLIP text tower)."""
    X = gather_visual(embeds, visual_mask).float()
    real = torch.ones_like(visual_mask) if attention_mask is None else attention_mask.bool()
    text = (real & ~visual_mask).float()  # [B, L]
    if bool((text.sum(1) == 0).any()):
        raise QavtpError("cdpruner needs text in every prompt to measure the visual tokens' relevance")
    cos = torch.nn.functional.normalize(X, dim=-1) @ torch.nn.functional.normalize(embeds.float(), dim=-1).transpose(
        1, 2
    )
    return (cos * text.unsqueeze(1)).sum(-1) / text.sum(1, keepdim=True)
