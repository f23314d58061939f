"""Ranger: RAdam with Lookahead and gradient centralisation, the optimiser CF-CLIP trains its mappers with.

Per parameter and step t (defaults as the official training uses them):
- gradient centralisation: a gradient with more than one dimension has its mean over all but the first
  dimension subtracted;
- Adam moments ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g²``;
- RAdam's rectification: with ``r_max = 2 / (1 - b2) - 1`` and ``r_t = r_max - 2 t b2^t / (1 - b2^t)``, the
  step is ``lr * sqrt((1 - b2^t)(r_t - 4)(r_t - 2) r_max / ((r_max - 4)(r_max - 2) r_t)) / (1 - b1^t) * m / (sqrt(v) + eps)``
  once ``r_t > 5``, and ``lr / (1 - b1^t) * m`` (momentum SGD) before that;
- Lookahead: every k steps the slow weights move ``alpha`` of the way to the fast ones, and the fast weights
  are reset to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

RECTIFY_THRESHOLD = 5.0


def rectified_step_size(step: int, beta1: float, beta2: float) -> tuple[float, bool]:
    """RAdam's step-size multiplier at ``step`` (1-based) and whether the adaptive (rectified) update applies."""
    beta2_t = beta2**step
    r_max = 2 / (1 - beta2) - 1
    r_t = r_max - 2 * step * beta2_t / (1 - beta2_t)
    if r_t > RECTIFY_THRESHOLD:
        rectifier = (1 - beta2_t) * (r_t - 4) / (r_max - 4) * (r_t - 2) / r_t * r_max / (r_max - 2)
        return math.sqrt(rectifier) / (1 - beta1**step), True
    return 1.0 / (1 - beta1**step), False


class Ranger(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        alpha: float = 0.5,
        k: int = 6,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 < alpha <= 1.0 or k < 1 or lr <= 0:
            raise ValueError(f"Ranger needs lr > 0, 0 < alpha <= 1 and k >= 1, got lr={lr}, alpha={alpha}, k={k}")
        super().__init__(params, dict(lr=lr, alpha=alpha, k=k, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                # half-precision parameters are updated in float32, others in their own precision
                compute = torch.promote_types(parameter.dtype, torch.float32)
                grad = parameter.grad.to(compute)
                if grad.dim() > 1:
                    grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["slow_buffer"] = parameter.detach().to(compute).clone()
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                step_size, rectified = rectified_step_size(state["step"], beta1, beta2)
                weights = parameter.detach().to(compute)
                if group["weight_decay"]:
                    weights.mul_(1 - group["weight_decay"] * group["lr"])
                if rectified:
                    weights.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size * group["lr"])
                else:
                    weights.add_(exp_avg, alpha=-step_size * group["lr"])
                if state["step"] % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(weights - slow, alpha=group["alpha"])
                    weights = slow
                parameter.copy_(weights)
        return loss
