"""Transductive vs per-step running batch norm at evaluation, for every algorithm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmeta.module import FewShotModule
from medmeta.networks.norm import EpisodeBatchNorm
from tests.conftest import module_for

ALGORITHMS = ["maml", "maml_pp", "meta_sgd", "anil", "protonet", "mann", "finetune"]
MAML_STEPS = {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 3}
SETTINGS: dict[str, dict[str, object]] = {
    "maml": MAML_STEPS, "maml_pp": {**MAML_STEPS, "multi_step_loss_epochs": 1}, "meta_sgd": MAML_STEPS, "anil": MAML_STEPS,
    "protonet": {}, "mann": {}, "finetune": {"pretrain_classes": 10, "finetune_steps": 5},
}  # fmt: skip


def _batch(seed: int, tasks: int = 2, n_way: int = 3, shots: int = 2, queries: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(n_way).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(n_way).repeat_interleave(queries).expand(tasks, -1)
    centres = torch.randn(tasks, n_way, 1, 16, 16, generator=g)
    support_x = centres[torch.arange(tasks)[:, None], support_y] + 0.5 * torch.randn(tasks, n_way * shots, 1, 16, 16, generator=g)
    query_x = centres[torch.arange(tasks)[:, None], query_y] + 0.5 * torch.randn(tasks, n_way * queries, 1, 16, 16, generator=g)
    classes = torch.stack([torch.randperm(10, generator=g)[:n_way] for _ in range(tasks)])
    return {
        "support_x": support_x, "support_y": support_y, "query_x": query_x, "query_y": query_y,
        "support_class": classes.gather(1, support_y), "query_class": classes.gather(1, query_y),
    }  # fmt: skip


def _module(algorithm: str, norm_mode: str) -> FewShotModule:
    torch.manual_seed(0)
    return module_for(algorithm, n_way=3, image_size=16, hidden_channels=8, norm_mode=norm_mode, **SETTINGS[algorithm])


def _train(module: FewShotModule, steps: int = 3) -> None:
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    for step in range(steps):
        loss, _ = module.algorithm.meta_loss(_batch(step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    module.eval()


def _predict(module: FewShotModule, b: dict[str, torch.Tensor], queries: slice) -> torch.Tensor:
    return module.algorithm.adapt_and_predict(b["support_x"], b["support_y"], b["query_x"][:, queries])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_running_mode_predicts_each_query_from_the_support_set_alone(algorithm: str) -> None:
    module = _module(algorithm, "running")
    _train(module)
    tracked = [m.num_batches_tracked for m in module.model.modules() if isinstance(m, EpisodeBatchNorm)]
    assert tracked and all(int(t.sum()) > 0 for t in tracked), "training filled no running statistics"
    b = _batch(100)
    together = _predict(module, b, slice(None))
    halves = torch.cat([_predict(module, b, slice(0, 5)), _predict(module, b, slice(5, None))], dim=1)
    torch.testing.assert_close(together, halves, rtol=1e-4, atol=1e-5)
    assert module.normalisation_label().startswith("running")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_transductive_mode_lets_queries_influence_each_other(algorithm: str) -> None:
    """The counter-check: the test above fails for transductive batch norm."""
    module = _module(algorithm, "transductive")
    _train(module)
    b = _batch(100)
    together = _predict(module, b, slice(None))
    halves = torch.cat([_predict(module, b, slice(0, 5)), _predict(module, b, slice(5, None))], dim=1)
    assert not torch.allclose(together, halves, rtol=1e-4, atol=1e-5)
    assert module.normalisation_label().startswith("transductive")


def test_running_mode_meta_gradient_equals_the_transductive_one() -> None:
    """Training forwards use batch statistics in both modes: same loss, same meta-gradient."""
    grads = {}
    for mode in ("transductive", "running"):
        module = _module("maml", mode)
        b = _batch(7)
        loss = module.algorithm.outer_loss(b["support_x"], b["support_y"], b["query_x"], b["query_y"])
        grads[mode] = torch.autograd.grad(loss, list(module.model.parameters()))
    for a, c in zip(grads["transductive"], grads["running"]):
        torch.testing.assert_close(a, c)


def test_maml_fills_the_slot_of_its_final_step_and_maml_pp_every_step() -> None:
    maml, maml_pp = _module("maml", "running"), _module("maml_pp", "running")
    _train(maml, steps=2)
    _train(maml_pp, steps=2)
    first = lambda m: next(x for x in m.model.modules() if isinstance(x, EpisodeBatchNorm))  # noqa: E731
    assert first(maml).num_batches_tracked.tolist() == [0, 0, 4]  # 2 meta-steps x 2 tasks, after 2 updates
    assert first(maml_pp).num_batches_tracked.tolist() == [0, 4, 4]  # multi-step loss: after 1 and 2 updates


def test_running_mode_needs_batch_norm() -> None:
    with pytest.raises(ValueError, match="applies to batch norm"):
        module_for(norm="group", norm_mode="running")
    with pytest.raises(ValueError, match="norm_mode"):
        FewShotModule(norm_mode="sometimes")  # type: ignore[arg-type]


class TorchBatchNormNet(nn.Module):
    """A user's backbone with torch's ``nn.BatchNorm2d`` (running statistics kept, torch's default)."""

    def __init__(self, *, in_channels: int = 1, n_way: int = 3, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.feature_dim, self.head = width, nn.Linear(width, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("algorithm", ["protonet", "finetune"])
def test_a_user_torch_batch_norm_with_running_statistics_is_not_called_transductive(algorithm: str) -> None:
    """In eval mode (validation, test, diagnose) torch's layer normalises every image with its running statistics."""
    torch.manual_seed(0)
    module = FewShotModule(algorithm={"class_path": algorithm, "init_args": SETTINGS[algorithm]}, n_way=3, image_size=16,
                           backbone={"class_path": f"{__name__}.TorchBatchNormNet"}, pixel_baseline=False)  # fmt: skip
    module.train()
    module.algorithm.meta_loss(_batch(0))  # running statistics no longer the defaults
    module.eval()
    b = _batch(100)
    together = _predict(module, b, slice(None))
    one_by_one = torch.cat([_predict(module, b, slice(i, i + 1)) for i in range(b["query_x"].shape[1])], dim=1)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    label = module.normalisation_label()
    assert label.startswith("running (the running statistics of the backbone's own torch batch-norm layers")
    assert "transductive" not in label
