"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5 and the reference model)."""

from __future__ import annotations

import torch
from torch import nn

from qavtp.models.base import Adapter, register


@register
class LlavaAdapter(Adapter):
    model_types = ("llava",)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        tower = self.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        layers = cfg.vision_feature_layer
        if isinstance(layers, int):
            feats = out.hidden_states[layers]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop [CLS]
        return feats

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def set_lm_head(self, module: nn.Module) -> None:
        self.model.lm_head = module

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)
