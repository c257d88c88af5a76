"""Random episode tensors shared by the algorithm tests (a leading task dimension T)."""

from __future__ import annotations

import torch


def random_episodes(
    tasks: int = 2, n_way: int = 3, k: int = 2, q: int = 2, side: int = 12, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``support_x [T, N*K, 1, side, side]``, ``support_y``, ``query_x``, ``query_y`` (labels sorted by class)."""
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, n_way * k, 1, side, side, generator=g, dtype=dtype)
    qx = torch.randn(tasks, n_way * q, 1, side, side, generator=g, dtype=dtype)
    sy = torch.arange(n_way).repeat_interleave(k).expand(tasks, -1).clone()
    qy = torch.arange(n_way).repeat_interleave(q).expand(tasks, -1).clone()
    return sx, sy, qx, qy


BODY = "features."  # the body's parameter names within medmeta's backbones (the head is "head.")


def body_grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradient of ``loss`` in each of the body's parameters (those under ``features.``)."""
    return list(torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n.startswith(BODY)]))


def assert_matches_reference(ours: torch.Tensor, reference: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    """Meta-losses equal (rtol 1e-10), and their meta-gradients in the body; returns the reference's gradients."""
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0.0)
    expected = body_grads(reference, model)
    for a, b in zip(body_grads(ours, model), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    return expected


def assert_body_grads_are_the_reference_and_head_unused(model: torch.nn.Module, reference: torch.Tensor) -> None:
    """After a module's ``backward``: each body parameter's ``.grad`` is the reference's gradient; the head has none."""
    body = [(n, p) for n, p in model.named_parameters() if n.startswith(BODY)]
    for (name, p), g in zip(body, body_grads(reference, model), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-12, msg=name)
    assert model.head.weight.grad is None and model.head.bias.grad is None
