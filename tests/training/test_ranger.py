"""Ranger against an independent numpy transcription of its update rule (RAdam + Lookahead + gradient centralisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfdeploy.training.ranger import Ranger


def numpy_ranger(weights, gradients, lr, betas=(0.95, 0.999), eps=1e-5, alpha=0.5, k=6):
    """The rule in float64 numpy: returns the weights after each step."""
    beta1, beta2 = betas
    w = weights.astype(np.float64)
    slow, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    r_max = 2 / (1 - beta2) - 1
    history = []
    for t, g in enumerate(gradients, start=1):
        g = g.astype(np.float64)
        if g.ndim > 1:
            g = g - g.reshape(len(g), -1).mean(axis=1).reshape((-1,) + (1,) * (g.ndim - 1))
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r_t = r_max - 2 * t * beta2**t / (1 - beta2**t)
        if r_t > 5:
            size = math.sqrt((1 - beta2**t) * (r_t - 4) * (r_t - 2) * r_max / ((r_max - 4) * (r_max - 2) * r_t))
            w = w - lr * size / (1 - beta1**t) * m / (np.sqrt(v) + eps)
        else:
            w = w - lr / (1 - beta1**t) * m
        if t % k == 0:
            slow = slow + alpha * (w - slow)
            w = slow.copy()
        history.append(w)
    return history


@pytest.mark.parametrize("shape", [(4, 3), (5,), (2, 3, 2)])
def test_updates_follow_the_rule_over_fourteen_steps(shape):
    rng = np.random.default_rng(len(shape))
    start = rng.standard_normal(shape).astype(np.float32)
    gradients = [rng.standard_normal(shape).astype(np.float32) * 10.0 ** rng.uniform(-3, 1) for _ in range(14)]
    parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = Ranger([parameter], lr=0.5)
    expected = numpy_ranger(start, gradients, lr=0.5)
    for step, gradient in enumerate(gradients):
        parameter.grad = torch.from_numpy(gradient.copy())
        optimizer.step()
        np.testing.assert_allclose(
            parameter.detach().numpy(), expected[step], rtol=1e-5, atol=1e-6, err_msg=f"step {step + 1}"
        )


def test_rectification_starts_at_step_six_and_lookahead_halves_the_way_back_at_k():
    """On a constant gradient g: steps 1-5 are bias-corrected momentum SGD (r_t <= 5 at beta2 0.999), so each
    moves exactly -lr g; step 6 is the first adaptive step, and Lookahead (k=6, alpha 0.5) then sets the weights
    halfway between the start (the slow weights) and where the fast weights got to."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    parameter = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = Ranger([parameter], lr=0.1)
    positions = []
    for _ in range(6):
        parameter.grad = g.clone()
        optimizer.step()
        positions.append(parameter.detach().clone())
    for step in range(5):
        torch.testing.assert_close(positions[step], -(step + 1) * 0.1 * g)
    beta1, beta2, t = 0.95, 0.999, 6
    r_max = 2 / (1 - beta2) - 1
    r_t = r_max - 2 * t * beta2**t / (1 - beta2**t)
    assert r_t > 5
    size = math.sqrt((1 - beta2**t) * (r_t - 4) * (r_t - 2) * r_max / ((r_max - 4) * (r_max - 2) * r_t))
    m_hat_over_sqrt_v = (1 - beta1**t) * g / (1 - beta1**t) / (math.sqrt(1 - beta2**t) * g.abs() + 1e-5)
    fast = positions[4] - 0.1 * size * m_hat_over_sqrt_v
    torch.testing.assert_close(positions[5], 0.5 * fast)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    gradients = [torch.randn(4, 4) for _ in range(10)]
    first = torch.nn.Parameter(torch.randn(4, 4))
    second = torch.nn.Parameter(first.detach().clone())
    uninterrupted = Ranger([first], lr=0.5)
    for gradient in gradients:
        first.grad = gradient.clone()
        uninterrupted.step()
    resumed = Ranger([second], lr=0.5)
    for gradient in gradients[:4]:
        second.grad = gradient.clone()
        resumed.step()
    saved = resumed.state_dict()
    second = torch.nn.Parameter(second.detach().clone())
    resumed = Ranger([second], lr=0.5)
    resumed.load_state_dict(saved)
    for gradient in gradients[4:]:
        second.grad = gradient.clone()
        resumed.step()
    assert torch.equal(first, second)
