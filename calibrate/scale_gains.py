"""A learned gain on every quantized weight group's scale: what alignment trains when the codes must stay fixed."""

from __future__ import annotations

import torch

from qavtp.calibrate.quantizers import QuantWeight, dequantize_weight


class ScaleGains(torch.nn.Module):
    """A learned gain on every group scale of every quantized weight (codes and zero points fixed).

    The quantized modules cache their dequantized weight; :meth:`rebuild` recomputes it from
    ``codes``, ``scale * gain`` and the zero points, differentiably, and must run before each forward pass
    that should see the current gains. :meth:`fold` multiplies the gains into the scales for good.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.owners = [m for m in model.modules() if isinstance(m, QuantWeight)]  # a list: not submodules
        self.gains = torch.nn.ParameterList([torch.nn.Parameter(torch.ones_like(m.scale)) for m in self.owners])

    def rebuild(self) -> None:
        for m, g in zip(self.owners, self.gains, strict=True):
            m.weight = dequantize_weight(m.qweight, m.scale * g, m.zero, m.wspec, dtype=m.scale.dtype)

    @torch.no_grad()
    def fold(self) -> dict[str, float]:
        """Scale the scales by the gains, rebuild the cached weights; returns the gains' spread."""
        flat = torch.cat([g.detach().flatten() for g in self.gains])
        for m, g in zip(self.owners, self.gains, strict=True):
            m.scale.mul_(g)
            m.refresh()
        return {
            "min": round(flat.min().item(), 4),
            "max": round(flat.max().item(), 4),
            "mean_abs_change": round((flat - 1).abs().mean().item(), 5),
        }
