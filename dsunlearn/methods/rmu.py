"""RMU (Li et al. 2024, WMDP): scramble the forget data's activations at one layer.

At decoder layer l of the language model (its output, the residual stream):
- forget step: mean over answer-and-prompt tokens of ||h_l(x_f) - c * u||^2 / d, u a fixed
  random unit vector (uniform [0, 1) entries, normalised, drawn once from a fixed seed so every
  rank holds the same one) and c the steering coefficient;
- retain step: alpha * mean ||h_l(x_r) - h_l^frozen(x_r)||^2 / d, the frozen vanilla model's
  activations read from the reference engine.
Only `method.rmu_modules` of layers l-2..l train (the reference code: `mlp.down_proj` of layers
5, 6, 7 of Zephyr-7B, with c = 6.5 and alpha = 1200).

Differences from the reference code, each for a reason:
- the mean runs over the attention mask's tokens (it averages padding in too, so its loss
  depends on how a batch is padded, and so on the rank count);
- forget and retain are separate optimizer steps, as every method here takes them (the paper
  sums them into one step);
- the layer's activations come from a whole forward with a hook (under ZeRO-3 the later layers'
  weights are gathered for nothing: a cost, not a difference in the result).
"""

from __future__ import annotations

from typing import Any

import torch

from dsunlearn.errors import ConfigError
from dsunlearn.methods.base import Method, register
from dsunlearn.models.encode import module_output
from dsunlearn.models.families import language_layers

# WMDP steers layer 7 of Zephyr-7B's 32: the default layer is the same depth, rounded.
_DEPTH = 7 / 32


def steered_layer(cfg_layer: int, n_layers: int) -> int:
    """The steered layer: `method.rmu_layer`, or (-1) WMDP's relative depth, at least 2 so that
    three layers train."""
    if cfg_layer < 0:
        return min(max(2, round(_DEPTH * n_layers)), n_layers - 1)
    if cfg_layer >= n_layers:
        raise ConfigError(f"method.rmu_layer={cfg_layer}: the model has {n_layers} decoder layers")
    return cfg_layer


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean over the mask's tokens of ||h - target||^2 / d, averaged over the batch
    (per-example means, so a batch split over ranks gives the same gradient)."""
    sq = (h.float() - target.float()).pow(2).mean(dim=-1)  # [B, T]
    m = mask.to(sq)
    return ((sq * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()


@register("rmu")
class RMU(Method):
    uses_retain = True
    uses_reference = True
    supports_lora = False  # it trains chosen MLP weights

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.rmu_steering <= 0 or cfg.rmu_alpha < 0:
            raise ConfigError("method.rmu_steering must be > 0 and method.rmu_alpha >= 0")
        if not cfg.rmu_modules:
            raise ConfigError("method.rmu_modules names no module to train")
        self.layer = -1
        self.trained_layers: list[int] = []
        self.direction: torch.Tensor | None = None

    def prepare_model(self, model: Any) -> None:
        """Freeze every weight but `rmu_modules` of layers l-2..l (before the engine is built)."""
        layers = language_layers(model)
        self.layer = steered_layer(self.cfg.rmu_layer, len(layers))
        self.trained_layers = list(range(max(0, self.layer - 2), self.layer + 1))
        model.requires_grad_(False)
        for i in self.trained_layers:
            for name in self.cfg.rmu_modules:
                try:
                    module = layers[i].get_submodule(name)
                except AttributeError as exc:
                    raise ConfigError(
                        f"method.rmu_modules: layer {i} has no module {name!r}"
                    ) from exc
                module.requires_grad_(True)

    def _states(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module_output(model, batch, language_layers(model)[self.layer])

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        if self.direction is None or self.direction.shape[-1] != h.shape[-1]:
            u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(0))
            self.direction = u / u.norm()
        return self.cfg.rmu_steering * self.direction.to(h.device)

    def forget_loss(self, model, batch, ref):
        h = self._states(model, batch)
        return masked_mse(h, self._control(h).expand_as(h), batch["attention_mask"])

    def retain_loss(self, model, batch, ref):
        ref = self.require_reference(ref)
        with torch.no_grad():
            frozen = self._states(ref, batch)
        h = self._states(model, batch)
        return self.cfg.rmu_alpha * masked_mse(h, frozen, batch["attention_mask"])

    def report_info(self) -> dict[str, Any]:
        return {"layer": self.layer, "trained_layers": self.trained_layers}
