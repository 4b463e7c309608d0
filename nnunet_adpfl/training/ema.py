"""Exponential moving average of the privately trained weights (setting ``ema_decay``).

It averages already-noised iterates, so it is post-processing and costs no privacy budget; the released final
model is the average (it smooths the noise the last steps added)."""
from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for n, p in params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: dict[str, nn.Parameter]) -> None:
        for n, p in params.items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the trained parameters (was dp_trainable changed?)")
        for n, t in state.items():
            self.shadow[n].copy_(t)
