"""Class-permutation equivariance and no query-label leakage for MAML, MAML++ and fine-tuning.

(Meta-SGD, ANIL, ProtoNet and the MANN have the same checks in their own test files.)
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from medmeta.algorithms import MAML, FineTune, MAMLPlusPlus
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes

PERM = torch.tensor([2, 0, 1])  # class c becomes class PERM[c]


_episodes = partial(random_episodes, tasks=2, q=3, side=12)


def _conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12).double()


def _permute_head_rows_(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in (model.head.weight, model.head.bias):
            permuted = torch.empty_like(tensor)
            permuted[PERM] = tensor
            tensor.copy_(permuted)


def _maml_pp() -> MAMLPlusPlus:
    algo = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, eval_inner_steps=3)
    with torch.no_grad():  # make the per-step state matter
        for rates in algo.inner_lrs.values():
            rates.uniform_(0.05, 0.3)
        for weights in algo.norm_weights.values():
            weights.add_(0.1 * torch.randn_like(weights))
    return algo


ALGORITHMS = {
    "maml": lambda: MAML(_conv4(), inner_lr=0.2, inner_steps=2, eval_inner_steps=3),
    "maml_pp": _maml_pp,
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_permuting_classes_with_the_head_rows_permutes_the_logits(name: str) -> None:
    algo = ALGORITHMS[name]()
    sx, sy, qx, qy = _episodes()
    with torch.no_grad():
        before = algo.adapt_and_predict(sx, sy, qx)
    _, train_before = algo.outer_loss_and_logits(sx, sy, qx, qy)
    _permute_head_rows_(algo.model)
    with torch.no_grad():
        after = algo.adapt_and_predict(sx, PERM[sy], qx)
    _, train_after = algo.outer_loss_and_logits(sx, PERM[sy], qx, PERM[qy])
    torch.testing.assert_close(after[..., PERM], before, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(train_after[..., PERM], train_before, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(after, before)  # the permutation is not a no-op


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_query_labels_never_reach_the_query_logits(name: str) -> None:
    algo = ALGORITHMS[name]()
    sx, sy, qx, qy = _episodes()
    _, logits = algo.outer_loss_and_logits(sx, sy, qx, qy)
    _, relabelled = algo.outer_loss_and_logits(sx, sy, qx, (qy + 1) % 3)
    shuffled = qy[:, torch.randperm(qy.shape[1], generator=torch.Generator().manual_seed(1))]
    _, reshuffled = algo.outer_loss_and_logits(sx, sy, qx, shuffled)
    assert torch.equal(logits, relabelled) and torch.equal(logits, reshuffled)


def _finetune(scope: str) -> FineTune:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12)
    return FineTune(model, pretrain_classes=6, finetune_steps=30, finetune_lr=0.05, finetune_scope=scope)


@pytest.mark.parametrize("scope", ["head", "last_block"])
def test_finetune_permuting_support_labels_permutes_the_logits(scope: str) -> None:
    """The new head starts at zero and Adam is elementwise: relabelling permutes its rows."""
    algo = _finetune(scope)
    sx, sy, qx, _ = (t.float() if t.is_floating_point() else t for t in _episodes())
    with torch.no_grad():
        before = algo.adapt_and_predict(sx, sy, qx)
        after = algo.adapt_and_predict(sx, PERM[sy], qx)
    torch.testing.assert_close(after[..., PERM], before, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before)


def test_finetune_last_block_adapts_a_copy_of_the_last_block_only() -> None:
    algo = _finetune("last_block")
    head_only = _finetune("head")
    sx, sy, qx, _ = (t.float() if t.is_floating_point() else t for t in _episodes())
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    with torch.no_grad():
        tuned = algo.adapt_and_predict(sx, sy, qx)
        probe = head_only.adapt_and_predict(sx, sy, qx)
    assert all(torch.equal(state[k], v) for k, v in algo.state_dict().items())  # the model is untouched
    assert not torch.allclose(tuned, probe)  # the last block did change for the task
    # A last block naming no parameter of `features` is refused when built (it used to fit the head alone).
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12)
    model.last_block_prefixes = lambda: ("no-such-parameter.",)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="last_block_prefixes.*must name parameters of `features`"):
        FineTune(model, pretrain_classes=6, finetune_scope="last_block")


def test_finetune_scope_is_checked() -> None:
    with pytest.raises(ValueError, match="finetune_scope"):
        _finetune("everything")
