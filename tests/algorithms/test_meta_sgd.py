"""Meta-SGD against a sequential autograd reference with per-element learning rates."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta.algorithms.meta_sgd import MetaSGD, lr_key
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes


def reference_meta_gradient(
    model: nn.Module, lrs: dict[str, torch.Tensor], sx, sy, qx, qy, *, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sequential second-order Meta-SGD with torch.autograd.grad(create_graph=True): (dθ, dα)."""
    names = [name for name, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    alpha = [lrs[name] for name in names]
    total = 0.0
    for t in range(sx.shape[0]):
        fast = list(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - a * g for w, a, g in zip(fast, alpha, grads)]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t])
    grads = torch.autograd.grad(total / sx.shape[0], theta + alpha)
    return list(grads[: len(theta)]), list(grads[len(theta) :])


_episodes = partial(random_episodes, tasks=2, q=2, side=12)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _algo(seed: int = 0, channels: int = 8, **kwargs) -> MetaSGD:
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=channels, image_size=12, norm="batch").double()
    return MetaSGD(model, **{"inner_lr": 0.2, "inner_steps": 2, **kwargs})


def test_learning_rates_are_per_element_parameters_initialised_to_inner_lr() -> None:
    algo = _algo(channels=4)
    names = {name for name, _ in algo.named_parameters()}
    for name, p in algo.model.named_parameters():
        lr = algo.inner_lrs[lr_key(name)]
        assert lr.shape == p.shape and lr.dtype == p.dtype
        assert torch.equal(lr, torch.full_like(lr, 0.2))
        assert f"inner_lrs.{lr_key(name)}" in names


def test_meta_gradient_for_weights_and_learning_rates_matches_sequential_reference() -> None:
    algo = _algo()
    with torch.no_grad():  # distinct per-element rates, so a scalar-rate bug cannot pass
        for lr in algo.inner_lrs.values():
            lr.uniform_(0.05, 0.3)
    sx, sy, qx, qy = _episodes()
    lrs = {name: algo.inner_lrs[lr_key(name)] for name, _ in algo.model.named_parameters()}
    ref_theta, ref_alpha = reference_meta_gradient(algo.model, lrs, sx, sy, qx, qy, steps=2)

    algo.zero_grad()
    algo.outer_loss(sx, sy, qx, qy).backward()
    ours_theta = [p.grad for p in algo.model.parameters()]
    ours_alpha = [lrs[name].grad for name, _ in algo.model.named_parameters()]
    assert _relative(ours_theta, ref_theta) < 1e-5
    assert _relative(ours_alpha, ref_alpha) < 1e-5
    # (b) every learning rate receives a non-zero gradient, except those of the conv biases: batch
    # norm subtracts the batch mean right after them, so their gradients are zero up to rounding
    conv_biases = {f"{m}.bias" for m, mod in algo.model.named_modules() if isinstance(mod, nn.Conv2d)}
    for name, g in zip(lrs, ours_alpha):
        assert (g.norm() < 1e-20) if name in conv_biases else (g.norm() > 1e-6), name


def test_adam_changes_the_learning_rates_and_makes_them_unequal() -> None:
    algo = _algo(channels=4, inner_steps=1)
    sx, sy, qx, qy = _episodes()
    optimiser = torch.optim.Adam(algo.parameters(), lr=1e-2)
    for _ in range(3):
        optimiser.zero_grad()
        algo.outer_loss(sx, sy, qx, qy).backward()
        optimiser.step()
    rates = torch.cat([lr.detach().flatten() for lr in algo.inner_lrs.values()])
    assert not torch.allclose(rates, torch.full_like(rates, 0.2))
    assert rates.std() > 1e-4


def test_query_labels_do_not_leak_into_logits() -> None:
    algo = _algo(channels=4, inner_steps=2, eval_inner_steps=2)
    sx, sy, qx, qy = _episodes()
    shuffled = qy[:, torch.randperm(qy.shape[1], generator=torch.Generator().manual_seed(1))]
    _, logits = algo.outer_loss_and_logits(sx, sy, qx, qy)
    _, logits_shuffled = algo.outer_loss_and_logits(sx, sy, qx, (qy + 1) % 3)
    _, logits_perm = algo.outer_loss_and_logits(sx, sy, qx, shuffled)
    with torch.no_grad():
        predicted = algo.adapt_and_predict(sx, sy, qx)
    assert torch.equal(logits, logits_shuffled) and torch.equal(logits, logits_perm)
    assert torch.allclose(predicted, logits.detach(), atol=1e-10)


def test_permuting_classes_with_the_head_rows_permutes_the_logits() -> None:
    algo = _algo(channels=4, eval_inner_steps=2)
    with torch.no_grad():
        for lr in algo.inner_lrs.values():
            lr.uniform_(0.05, 0.3)
    sx, sy, qx, _ = _episodes()
    perm = torch.tensor([2, 0, 1])  # class c becomes class perm[c]
    with torch.no_grad():
        before = algo.adapt_and_predict(sx, sy, qx)
        for name in ("head.weight", "head.bias"):
            for tensor in (algo.model.get_parameter(name), algo.inner_lrs[lr_key(name)]):
                permuted = torch.empty_like(tensor)
                permuted[perm] = tensor
                tensor.copy_(permuted)
        after = algo.adapt_and_predict(sx, perm[sy], qx)
    assert torch.allclose(after[..., perm], before, atol=1e-10)


def _one_outer_step(rates_meta_lr: float | None, learner: str = "meta_sgd") -> tuple[float, float]:
    """The largest change of a weight and of a learned rate after one Adam step of the module's own optimiser."""
    from tests.conftest import module_for

    torch.manual_seed(0)
    module = module_for(learner, n_way=3, image_size=12, hidden_channels=4, inner_steps=1, inner_lr=0.5,
                        rates_meta_lr=rates_meta_lr, meta_lr=1e-3)  # fmt: skip
    optimiser = module.configure_optimizers()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    sx, sy, qx, qy = random_episodes(tasks=2, q=2, side=12, dtype=torch.float32)
    module.algorithm.outer_loss(sx, sy, qx, qy).backward()
    optimiser.step()
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in module.named_parameters()}
    rates = max(v for name, v in moved.items() if "inner_lrs" in name)
    return max(v for name, v in moved.items() if "inner_lrs" not in name), rates


@pytest.mark.parametrize("learner", ["meta_sgd", "maml_pp"])  # per-element rates, and MAML++'s per-layer per-step ones
def test_rates_meta_lr_gives_the_learned_rates_their_own_outer_step(learner: str) -> None:
    """Adam's first step moves a parameter by about its group's rate: θ by meta_lr, α by rates_meta_lr."""
    weights, rates = _one_outer_step(0.05, learner)
    assert weights <= 1e-3 * 1.01 and rates == pytest.approx(0.05, rel=0.01)
    weights, rates = _one_outer_step(None, learner)  # the default: one rate for all, as before the setting
    assert weights <= 1e-3 * 1.01 and rates <= 1e-3 * 1.01


def test_every_learners_optimiser_holds_each_meta_parameter_once() -> None:
    from medmeta.algorithms import SHORT_NAMES
    from tests.conftest import module_for

    for name in SHORT_NAMES:
        module = module_for(name, n_way=3, image_size=12, hidden_channels=4)
        optimiser = module.configure_optimizers()
        held = [id(p) for group in optimiser.param_groups for p in group["params"]]
        assert sorted(held) == sorted(id(p) for p in module.parameters()), name


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf")])
def test_rates_meta_lr_must_be_positive(value: float) -> None:
    from medmeta.algorithms.maml_pp import MAMLPlusPlus

    with pytest.raises(ValueError, match="rates_meta_lr"):
        _algo(channels=4, rates_meta_lr=value)
    with pytest.raises(ValueError, match="rates_meta_lr"):
        MAMLPlusPlus(Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12), rates_meta_lr=value)


def test_maml_pp_refuses_rates_meta_lr_without_learned_rates() -> None:
    """Without learned rates the setting would apply to nothing: refused, not ignored."""
    from medmeta.algorithms.maml_pp import MAMLPlusPlus

    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12)
    with pytest.raises(ValueError, match="rates_meta_lr .* learn_inner_lrs: true"):
        MAMLPlusPlus(model, learn_inner_lrs=False, rates_meta_lr=0.01)
    assert MAMLPlusPlus(model, learn_inner_lrs=False).parameter_groups(1e-3)[0]["lr"] == 1e-3


def test_none_is_a_rate_only_where_it_is_the_default() -> None:
    """``rates_meta_lr: None`` means the module's meta_lr; ``inner_lr: None`` is refused by name, not a traceback."""
    from tests.conftest import module_for

    module_for("meta_sgd", n_way=3, image_size=12, hidden_channels=4, rates_meta_lr=None)
    with pytest.raises(ValueError, match="model.algorithm.init_args.inner_lr must be a positive learning rate"):
        module_for("meta_sgd", n_way=3, image_size=12, hidden_channels=4, inner_lr=None)
