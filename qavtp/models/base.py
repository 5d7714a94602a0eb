"""The adapter interface: everything qavtp needs to know about one multimodal architecture.

A new MLLM is one new module that subclasses :class:`Adapter` and calls :func:`register`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn


class Adapter:
    """Access to the parts of a loaded model that calibration, scoring and export touch."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        # qavtp.models.streaming.LayerStream when the decoder layers live on the meta device (a streamed checkpoint)
        self.stream = None

    def resident(self, i: int):
        """A context in which decoder layer ``i`` holds its weights: a no-op unless the model is streamed."""
        return nullcontext(self.decoder_layers[i]) if self.stream is None else self.stream.resident(i)

    # -- vision side -------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-tower features fed to the projector, ``[B, N, D_vision]``."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Projector output: visual tokens in the LLM's embedding space, ``[B, N, D]``."""
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    @property
    def projector(self) -> nn.Module:
        raise NotImplementedError

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.vision_features(pixel_values))

    # -- language side -----------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    def set_embed_tokens(self, module: nn.Module) -> None:
        self.language_model.embed_tokens = module

    def set_lm_head(self, module: nn.Module) -> None:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[B, L]`` of the positions that hold visual tokens."""
        return input_ids == self.image_token_id

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with the visual tokens scattered into their placeholder positions."""
        ids = input_ids.clone()
        mask = self.visual_positions(input_ids)
        # The placeholder id may lie outside the text vocabulary (it does in some checkpoints).
        ids[mask] = 0
        emb = self.embed_tokens(ids)
        if pixel_values is not None and mask.any():
            vis = self.visual_tokens(pixel_values).to(emb.dtype)
            emb = emb.masked_scatter(mask[..., None], vis.reshape(-1, vis.shape[-1]))
        return emb


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[Adapter] | None:
    return _REGISTRY.get(model_type)
