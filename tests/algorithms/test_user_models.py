"""A user's own model under ``task_parallel="vmap"``: the exact meta-gradient (engineering notes, trap 13).

torch's ``nn.BatchNorm2d``/``nn.InstanceNorm2d`` under ``vmap`` gave second-order meta-gradients 2e-2
off. For user-built Conv-4s with torch's norm layers and a MONAI network, in float64, 3 tasks and
3 inner steps, every gradient-based algorithm's vmap meta-gradient must equal its loop's to 1e-10,
and the loop must equal the plain sequential ``torch.autograd.grad(create_graph=True)`` reference.
The fused kernels go wrong when the norm weights are adapted per task (batched under vmap): MAML,
Meta-SGD and MAML++ without per-step norm weights. ANIL (the body is not adapted), MAML++ with
per-step norm weights (not adapted either) and batch norm in eval mode were exact before the fix
and are kept as checks.
Layers that update running statistics cannot run under vmap: the loop runs, with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier
from torch import nn

from medmeta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from medmeta.algorithms.meta_sgd import lr_key
from tests.algorithms.episodes import random_episodes
from tests.algorithms.test_anil import reference_meta_gradient as anil_reference
from tests.algorithms.test_maml import reference_meta_gradient as maml_reference
from tests.algorithms.test_maml_pp import _randomise, reference_query_logits
from tests.algorithms.test_meta_sgd import reference_meta_gradient as meta_sgd_reference

SIDE, CHANNELS, STEPS = 10, 16, 3


class UserNet(nn.Module):
    """A user's network: ``features`` (any body ending in a flat vector) and a linear ``head``."""

    def __init__(self, features: nn.Module, feature_dim: int, n_way: int = 3) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def user_conv4(norm: Callable[[int, int], nn.Module]) -> UserNet:
    """Conv-4 of torch layers with ``norm(channels, side)`` after every conv (16 channels, 10x10)."""
    blocks: list[nn.Module] = []
    channels, side = 1, SIDE
    for _ in range(4):
        blocks += [nn.Conv2d(channels, CHANNELS, 3, padding=1), norm(CHANNELS, side), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        channels, side = CHANNELS, -(-side // 2)
    return UserNet(nn.Sequential(*blocks, nn.Flatten()), CHANNELS * side * side)


def _batch_norm_eval() -> UserNet:
    """torch's default BatchNorm2d in eval mode: it normalises with (random) running statistics."""
    model = user_conv4(lambda c, s: nn.BatchNorm2d(c))
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.normal_(0.0, 0.3), layer.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _monai() -> UserNet:
    """A MONAI Classifier (residual units, batch norm) as the body."""
    body = Classifier(
        in_shape=(1, SIDE, SIDE), classes=CHANNELS, channels=(8, 16), strides=(2, 2), num_res_units=1,
        norm=("batch", {"track_running_stats": False}),
    )  # fmt: skip
    return UserNet(body, CHANNELS)


MODELS: dict[str, Callable[[], UserNet]] = {
    "BatchNorm2d": lambda: user_conv4(lambda c, s: nn.BatchNorm2d(c, track_running_stats=False)),
    "BatchNorm2d-eval": _batch_norm_eval,
    "InstanceNorm2d": lambda: user_conv4(lambda c, s: nn.InstanceNorm2d(c, affine=True)),
    "GroupNorm": lambda: user_conv4(lambda c, s: nn.GroupNorm(4, c)),
    "LayerNorm": lambda: user_conv4(lambda c, s: nn.LayerNorm([c, s, s])),
    "monai.Classifier": _monai,
}


def _model(name: str) -> UserNet:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    with torch.no_grad():  # norm weights away from 1 and 0, so that every term of the gradient shows
        for param_name, p in model.named_parameters():
            if p.dim() == 1 and "head" not in param_name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _episodes() -> tuple[torch.Tensor, ...]:
    return random_episodes(tasks=3, k=1, q=2, side=SIDE, dtype=torch.float64)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _build(algorithm: str, model: nn.Module, task_parallel: str) -> tuple[MAML, list[torch.Tensor]]:
    """The algorithm around ``model`` and the meta-learned tensors its gradient is taken for."""
    if algorithm == "maml":
        algo = MAML(model, inner_lr=0.2, inner_steps=STEPS, task_parallel=task_parallel)
        return algo, list(model.parameters())
    if algorithm == "anil":
        algo = ANIL(model, inner_lr=0.5, inner_steps=STEPS, task_parallel=task_parallel)
        return algo, list(model.parameters())
    if algorithm == "meta_sgd":
        algo = MetaSGD(model, inner_lr=0.2, inner_steps=STEPS, task_parallel=task_parallel)
        torch.manual_seed(1)
        with torch.no_grad():
            for rates in algo.inner_lrs.values():
                rates.uniform_(0.05, 0.3)
        return algo, [*model.parameters(), *(algo.inner_lrs[lr_key(n)] for n, _ in model.named_parameters())]
    algo = MAMLPlusPlus(
        model, inner_lr=0.3, inner_steps=STEPS, multi_step_loss_epochs=10, task_parallel=task_parallel,
        per_step_norm_weights=algorithm == "maml_pp",  # else the norm weights are adapted, as in MAML
    )  # fmt: skip
    algo.set_epoch(3)
    torch.manual_seed(1)
    _randomise(algo)
    algo.double()
    return algo, [*model.parameters(), *algo.norm_weights.values(), *algo.inner_lrs.values()]


def _reference(algorithm: str, algo: MAML, params: list[torch.Tensor], batch) -> list[torch.Tensor]:
    """The plain sequential ``torch.autograd.grad(create_graph=True)`` meta-gradient."""
    model = algo.model
    if algorithm == "maml":
        return maml_reference(model, *batch, lr=0.2, steps=STEPS)
    if algorithm == "anil":
        return anil_reference(model, *batch, lr=0.5, steps=STEPS)
    if algorithm == "meta_sgd":
        lrs = {name: algo.inner_lrs[lr_key(name)] for name, _ in model.named_parameters()}
        theta, alpha = meta_sgd_reference(model, lrs, *batch, steps=STEPS)
        return theta + alpha
    sx, sy, qx, qy = batch
    logits = reference_query_logits(algo, sx, sy, qx, steps=STEPS)
    losses = torch.stack([torch.stack([F.cross_entropy(lg, qy[t]) for lg in row]) for t, row in enumerate(logits)])
    loss = (losses * algo.multi_step_loss_weights().to(losses.dtype)).sum(1).mean()
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "anil", "maml_pp", "maml_pp-adapted-norms"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_vmap_equals_the_loop_and_the_sequential_reference(model_name: str, algorithm: str) -> None:
    batch = _episodes()
    grads = {}
    for task_parallel in ("loop", "vmap"):
        algo, params = _build(algorithm, _model(model_name), task_parallel)
        assert algo.vectorises(batch[0].device) == (task_parallel == "vmap")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback: the vmap path really ran
            grads[task_parallel] = list(torch.autograd.grad(algo.outer_loss(*batch), params))
    assert _relative(grads["vmap"], grads["loop"]) < 1e-10
    assert _relative(grads["loop"], _reference(algorithm, algo, params, batch)) < 1e-10


class FunctionalRunningBatchNorm(nn.Module):
    """A user's layer that calls ``F.batch_norm`` itself and updates its running statistics."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True)


@pytest.mark.parametrize(
    "norm, layer",
    [
        (lambda c, s: nn.BatchNorm2d(c), "'features.1' (BatchNorm2d)"),
        (lambda c, s: nn.InstanceNorm2d(c, affine=True, track_running_stats=True), "'features.1' (InstanceNorm2d)"),
        (lambda c, s: FunctionalRunningBatchNorm(c), "'features.1' (FunctionalRunningBatchNorm)"),
    ],
    ids=["BatchNorm2d", "InstanceNorm2d-running", "user-F.batch_norm"],
)
def test_running_statistic_updates_fall_back_to_the_loop_with_one_warning(norm, layer: str) -> None:
    """ANIL runs the body outside the inner gradient, so running statistics update in the loop; vmap cannot."""
    batch, grads, buffers = _episodes(), {}, {}
    for task_parallel in ("loop", "vmap"):
        torch.manual_seed(0)
        model = user_conv4(norm).double()
        algo = ANIL(model, inner_lr=0.5, inner_steps=STEPS, task_parallel=task_parallel)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads[task_parallel] = list(torch.autograd.grad(algo.outer_loss(*batch), list(model.parameters())))
            algo.outer_loss(*batch)  # a second meta-step: no second warning
            assert not algo.vectorises(torch.device("cuda"))  # nor under "auto" on a GPU
        messages = [str(w.message) for w in caught]
        if task_parallel == "vmap":
            assert len(messages) == 1 and layer in messages[0] and "loop" in messages[0], messages
        else:
            assert messages == []
        buffers[task_parallel] = [b.clone() for b in model.buffers()]
    assert _relative(grads["vmap"], grads["loop"]) < 1e-12
    for ours, loop in zip(buffers["vmap"], buffers["loop"], strict=True):
        torch.testing.assert_close(ours, loop, rtol=0, atol=0)  # updated exactly as often as in the loop


@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm", [MAML, MAMLPlusPlus])
def test_running_statistics_in_the_inner_loop_are_refused_with_a_clear_message(algorithm, task_parallel: str) -> None:
    model = user_conv4(lambda c, s: nn.BatchNorm2d(c)).double()
    algo = algorithm(model, inner_lr=0.2, inner_steps=1, task_parallel=task_parallel)
    before = {name: b.clone() for name, b in model.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"'features\.1' \(BatchNorm2d\).*track_running_stats=False"):
            algo.outer_loss(*_episodes())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    model.eval()  # eval mode uses the running statistics without updating them: allowed
    assert torch.isfinite(algo.outer_loss(*_episodes()))


def test_the_user_model_is_not_changed() -> None:
    """No layer is swapped: the model's modules, state_dict and a checkpoint round trip stay as they were."""
    model = _model("BatchNorm2d-eval")
    types = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    algo = MAML(model, inner_lr=0.2, inner_steps=STEPS, task_parallel="vmap")
    algo.outer_loss(*_episodes())
    assert [type(m) for m in model.modules()] == types
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    fresh = _model("BatchNorm2d-eval")
    fresh.load_state_dict(algo.model.state_dict())
    x = _episodes()[0][0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
