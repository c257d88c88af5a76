"""EpisodeBatchNorm: batch norm from var_mean ops, with per-step running statistics on request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmeta.networks.norm import (
    EpisodeBatchNorm,
    EpisodeInstanceNorm,
    composite_norms,
    query_statistics,
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
