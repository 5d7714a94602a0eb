"""Running the LLM on a pruned prompt with a KV cache that stays consistent, for scoring and generation.

Pruning at layer K > 0 leaves two kinds of layers: those before K saw (and cached) the full prompt, those
from K on only the kept tokens. Hugging Face builds one attention mask for all layers from one cache length,
so this module runs the decoder layers itself, with one padding mask per group of layers:

- layers < K: the full prompt (keys of every prompt token),
- layers >= K: the pruned prompt.

Tokens appended later (answer candidates, generated tokens) extend both masks and continue at the next
position of the original numbering for K > 0 (survivors kept their positions), or of the shortened prompt
for K = 0 (it is an ordinary, shorter prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from qavtp.errors import QavtpError
from qavtp.prompting import position_ids as left_padded_positions
from qavtp.pruning import _gather_seq, check_ratio, kept_positions, select_tokens
from qavtp.scoring import check_layer


@dataclass
class PrunedCache:
    """The KV cache and masks after a pruned prefill; :func:`extend` appends tokens to it."""

    cache: DynamicCache
    layer_k: int
    full_mask: Tensor  # [B, S0] keys of layers < K (empty use when K = 0)
    pruned_mask: Tensor  # [B, S1] keys of layers >= K
    next_pos: Tensor  # [B] position id of the next token
    keep_idx: Tensor  # [B, k] kept visual tokens, ascending

    def select(self, rows: Tensor) -> PrunedCache:
        """The state of some rows (repeats allowed): one row per candidate answer, say."""
        self.cache.reorder_cache(rows)
        return PrunedCache(
            self.cache,
            self.layer_k,
            self.full_mask[rows],
            self.pruned_mask[rows],
            self.next_pos[rows],
            self.keep_idx[rows],
        )


def _mask(pad: Tensor, T: int) -> Tensor:
    """Boolean ``[B, 1, T, S]`` mask (True: may attend) for the last T of S positions: causal, no padding keys.

    A query always sees itself, so a padding row never becomes fully masked (SDPA would return NaN there
    and the NaN would reach real tokens through 0 * NaN).
    """
    B, S = pad.shape
    q = torch.arange(T, device=pad.device)[:, None] + (S - T)
    k = torch.arange(S, device=pad.device)[None, :]
    allowed = ((k <= q)[None] & pad.bool()[:, None, :]) | (k == q)[None]
    return allowed[:, None]


def _attention_mask(model, pad: Tensor, T: int, dtype: torch.dtype) -> Tensor:
    m = _mask(pad, T)
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        # eager attention adds its mask to the logits
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
    return m


def _run(adapter, layers, h: Tensor, pad: Tensor, position_ids: Tensor, cache: DynamicCache) -> Tensor:
    if not layers:
        return h
    lm = adapter.language_model
    mask = _attention_mask(adapter.model, pad, h.shape[1], h.dtype)
    cos_sin = lm.rotary_emb(h, position_ids)
    for layer in layers:
        h = layer(
            h, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, position_embeddings=cos_sin
        )
        h = h[0] if isinstance(h, tuple) else h
    return h


def _logits(adapter, h: Tensor) -> Tensor:
    return adapter.lm_head(adapter.final_norm(h))


@torch.no_grad()
def pruned_prefill(
    adapter,
    enc,
    keep: Tensor | Callable,
    rho: float | None = None,
    layer_k: int = 0,
) -> tuple[Tensor, PrunedCache]:
    """Last-position logits ``[B, V]`` of the prompt with visual tokens pruned at layer K, and the state.

    ``keep`` is a ``[B, k]`` tensor of kept visual-token indices, or a function of ``(hidden [B, L, D] entering
    layer K, visual mask [B, L], attention mask, position ids)`` returning scores ``[B, N]``; the top
    ``ceil(rho N)`` are kept.
    """
    layers = adapter.decoder_layers
    K = check_layer(len(layers), layer_k)
    ids = enc["input_ids"]
    pad = enc.get("attention_mask")
    pad = torch.ones_like(ids) if pad is None else pad
    pos = enc.get("position_ids")
    pos = left_padded_positions(pad) if pos is None else pos
    visual = adapter.visual_positions(ids)
    h = adapter.embed(ids, enc.get("pixel_values"))
    cache = DynamicCache(config=adapter.language_model.config)
    h = _run(adapter, list(layers[:K]), h, pad, pos, cache)
    if isinstance(keep, Tensor):
        keep_idx = keep
    else:
        if rho is None:
            raise QavtpError("a scoring function needs a retention ratio rho")
        keep_idx = select_tokens(keep(h, visual, pad, pos), check_ratio(rho))
    positions, _ = kept_positions(visual, keep_idx)
    h = _gather_seq(h, positions)
    pruned_pad = pad.gather(1, positions)
    # K = 0: the shortened prompt is an ordinary prompt, numbered afresh; K > 0: survivors keep their numbers.
    pruned_pos = left_padded_positions(pruned_pad) if K == 0 else pos.gather(1, positions)
    h = _run(adapter, list(layers[K:]), h, pruned_pad, pruned_pos, cache)
    state = PrunedCache(cache, K, pad if K else pad[:, :0], pruned_pad, pruned_pos[:, -1] + 1, keep_idx.sort(1).values)
    return _logits(adapter, h[:, -1]), state


@torch.no_grad()
def extend(adapter, state: PrunedCache, input_ids: Tensor, pad: Tensor | None = None) -> Tensor:
    """Logits ``[B, T, V]`` of ``input_ids [B, T]`` (right-padded by ``pad``) appended to ``state`` (updated)."""
    layers = adapter.decoder_layers
    T = input_ids.shape[1]
    pad = torch.ones_like(input_ids) if pad is None else pad
    pos = state.next_pos[:, None] + torch.arange(T, device=input_ids.device)
    h = adapter.embed_tokens(input_ids)
    K = state.layer_k
    state.full_mask = torch.cat([state.full_mask, pad], 1) if K else state.full_mask
    state.pruned_mask = torch.cat([state.pruned_mask, pad], 1)
    h = _run(adapter, list(layers[:K]), h, state.full_mask, pos, state.cache)
    h = _run(adapter, list(layers[K:]), h, state.pruned_mask, pos, state.cache)
    state.next_pos = state.next_pos + pad.sum(1)
    return _logits(adapter, h)


@torch.no_grad()
def pruned_generate(adapter, state: PrunedCache, first_logits: Tensor, eos_id: int | None, max_new_tokens: int = 8):
    """Greedy continuation after :func:`pruned_prefill`: token ids ``[B, <= max_new_tokens]``."""
    out = []
    done = torch.zeros(first_logits.shape[0], dtype=torch.bool)
    logits = first_logits
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if done.all():
            break
        logits = extend(adapter, state, nxt[:, None])[:, -1]
    return torch.stack(out, 1)
