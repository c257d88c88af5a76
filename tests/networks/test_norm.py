"""EpisodeBatchNorm: batch norm from var_mean ops, with per-step running statistics on request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from medmeta.networks import Conv4
from medmeta.networks.norm import (
    EpisodeBatchNorm,
    EpisodeInstanceNorm,
    NotVectorisable,
    composite_norms,
    describe_normalisation,
    needs_composite_calls,
    query_statistics,
    running_statistic_updates,
    uses_running_statistics,
)


@pytest.mark.parametrize("composite", [False, True])
@pytest.mark.parametrize("kind", ["batch", "instance"])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 4, 3, 3, 3)])
def test_matches_torch_norms_values_and_gradients(shape: tuple[int, ...], kind: str, composite: bool) -> None:
    torch.manual_seed(0)
    layer = (EpisodeBatchNorm(4) if kind == "batch" else EpisodeInstanceNorm(4)).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    if composite:
        with composite_norms(layer):
            ours = layer(x)
        assert not layer.composite
    else:
        ours = layer(x)
    if kind == "batch":
        ref = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    else:
        ref = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad((ours * torch.arange(ours.numel()).view_as(ours)).sum(), [x, layer.weight])
    ref_grads = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref)).sum(), [x, layer.weight])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_transductive_layer_keeps_no_buffers_and_ignores_query_marking() -> None:
    layer = EpisodeBatchNorm(3).eval()
    assert dict(layer.named_buffers()) == {} and not uses_running_statistics(layer)
    x = torch.randn(4, 3, 2, 2)
    with query_statistics(layer, 0):
        torch.testing.assert_close(layer(x), layer.train()(x))


def test_running_statistics_update_only_for_marked_query_forwards_in_training() -> None:
    torch.manual_seed(0)
    layer = EpisodeBatchNorm(3, running_stat_steps=3, momentum=0.5)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    layer(x)  # a support forward: no update
    assert int(layer.num_batches_tracked.sum()) == 0
    with query_statistics(layer, 1):
        layer(x)
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean[1], 0.5 * mean)
    torch.testing.assert_close(layer.running_var[1], 0.5 * torch.ones(3) + 0.5 * var)
    assert layer.num_batches_tracked.tolist() == [0, 1, 0]
    with query_statistics(layer, 7):  # past the last slot: the last slot
        layer(x)
    assert layer.num_batches_tracked.tolist() == [0, 1, 1]
    assert layer.query_step is None  # the marking ends with the block


def test_eval_queries_use_running_statistics_and_do_not_depend_on_each_other() -> None:
    torch.manual_seed(0)
    layer = EpisodeBatchNorm(3, running_stat_steps=2)
    for _ in range(20):
        with query_statistics(layer, 1):
            layer(torch.randn(16, 3, 4, 4) * 3 + 2)
    layer.eval()
    queries = torch.randn(6, 3, 4, 4)
    with query_statistics(layer, 1):
        together = layer(queries)
        alone = torch.cat([layer(q.unsqueeze(0)) for q in queries])
    torch.testing.assert_close(together, alone)
    expected = (queries - layer.running_mean[1].view(1, 3, 1, 1)) / torch.sqrt(layer.running_var[1].view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(together, expected)
    # Support forwards (unmarked) use their own batch statistics even in eval mode.
    assert not torch.allclose(layer(queries), together)
    torch.testing.assert_close(layer(queries), layer.train()(queries))


def test_unfilled_slots_fall_back_to_the_nearest_filled_slot_lower_first() -> None:
    layer = EpisodeBatchNorm(2, running_stat_steps=5)
    for step, shift in ((1, 5.0), (3, -5.0)):
        with query_statistics(layer, step):
            layer(torch.randn(8, 2, 3, 3) + shift)
    layer.eval()
    x = torch.randn(3, 2, 3, 3)
    outputs = {}
    for step in range(7):
        with query_statistics(layer, step):
            outputs[step] = layer(x)
    assert not torch.allclose(outputs[1], outputs[3])
    for step, source in ((0, 1), (2, 1), (4, 3), (6, 3)):
        torch.testing.assert_close(outputs[step], outputs[source])


TORCH_NORMS = {  # layer, input shape
    "BatchNorm1d": (nn.BatchNorm1d, (6, 4, 5)),
    "BatchNorm1d-flat": (nn.BatchNorm1d, (6, 4)),
    "BatchNorm2d": (nn.BatchNorm2d, (6, 4, 5, 5)),
    "BatchNorm3d": (nn.BatchNorm3d, (6, 4, 3, 3, 3)),
    "InstanceNorm1d": (nn.InstanceNorm1d, (6, 4, 5)),
    "InstanceNorm2d": (nn.InstanceNorm2d, (6, 4, 5, 5)),
    "InstanceNorm3d": (nn.InstanceNorm3d, (6, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine, track", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("kind", list(TORCH_NORMS))
def test_composite_calls_match_torch_batch_and_instance_norm_layers(kind: str, affine: bool, track: bool, training: bool) -> None:
    """Under ``composite_norms`` torch's own layers give the same values and gradients, or refuse an update."""
    torch.manual_seed(0)
    cls, shape = TORCH_NORMS[kind]
    layer = cls(4, affine=affine, track_running_stats=track, momentum=0.3, eps=1e-3).double().train(training)
    assert needs_composite_calls(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        if track:
            layer.running_mean.normal_(0.0, 0.5), layer.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    if training and track:  # the forward would update running statistics: impossible task by task under vmap
        assert [name for name, _ in running_statistic_updates(layer)] == [""]
        with pytest.raises(NotVectorisable, match="running statistics"), composite_norms(layer):
            layer(x)
        return
    assert running_statistic_updates(layer) == []
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    with composite_norms(layer):
        ours = layer(x)
    ref = layer(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for name, b in layer.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0)
    weights = torch.arange(ours.numel(), dtype=ours.dtype).view_as(ours)
    inputs = [x, *layer.parameters()]
    with composite_norms(layer):
        grads = torch.autograd.grad((layer(x) * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(5,), (4, 3, 5)], ids=["last-dim", "three-dims"])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_composite_calls_match_torch_layer_norm(shape: tuple[int, ...], affine: bool, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.LayerNorm(shape, eps=1e-3, elementwise_affine=affine, bias=bias).double()
    assert needs_composite_calls(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    inputs = [x, *layer.parameters()]
    with composite_norms(layer):
        ours = layer(x)
        grads = torch.autograd.grad((ours**3).sum(), inputs)
    ref = layer(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad((ref**3).sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class _FusedCaller(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, False)


def test_composite_calls_guard_unknown_modules_and_spare_known_ones() -> None:
    """Only models with torch batch/instance/layer norms or unknown module types pay for the call-level guard."""
    assert not needs_composite_calls(Conv4(hidden_channels=4, image_size=8, norm="batch"))
    assert not needs_composite_calls(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten()))
    assert needs_composite_calls(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    assert needs_composite_calls(nn.Sequential(nn.Linear(3, 3), _FusedCaller()))
    caller = _FusedCaller()
    with pytest.raises(NotVectorisable, match="batch_norm"), composite_norms(caller):
        caller(torch.randn(4, 3))
    caller(torch.randn(4, 3))  # outside the block: untouched


def _with_torch_norm(track: bool, norm: str = "batch", running_stat_steps: int = 0) -> nn.Module:
    """A Conv-4 (medmeta's norm layers of ``norm``) with a torch ``BatchNorm2d`` added after its first block."""
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm=norm,
                  running_stat_steps=running_stat_steps)
    model.features.insert(1, nn.BatchNorm2d(4, track_running_stats=track))
    return model


def test_normalisation_label_names_what_each_kind_of_batch_norm_does_at_evaluation() -> None:
    """A torch batch norm keeping running statistics uses them in eval mode (non-transductive); one without them,
    or medmeta's in transductive mode, uses batch statistics; a mixed model names both, the transductive one first."""
    batches = "each adaptation/query batch"
    own = "running (the running statistics of the backbone's own torch batch-norm layers, in eval mode"
    alone = describe_normalisation(_with_torch_norm(True, norm="group"), "transductive", batches)
    assert alone.startswith(own) and "transductive" not in alone  # diagnose reads "transductive" as one batch
    assert describe_normalisation(_with_torch_norm(False, norm="group"), "transductive", batches) == (
        f"transductive (batch statistics of {batches})")
    mixed = describe_normalisation(_with_torch_norm(True), "transductive", batches)
    assert mixed.startswith(f"transductive (batch statistics of {batches}) in medmeta's batch-norm layers; {own}")
    running = describe_normalisation(_with_torch_norm(True, running_stat_steps=1), "running", batches)
    assert running.startswith("running (per-inner-step") and own in running and not running.startswith("transductive")
    both = describe_normalisation(_with_torch_norm(False, running_stat_steps=1), "running", batches)
    assert both.startswith("transductive (batch statistics of each adaptation/query batch) in torch batch-norm layers "
                           "without running statistics; running (per-inner-step")
    plain = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8)
    assert describe_normalisation(plain, "transductive", batches) == f"transductive (batch statistics of {batches})"
