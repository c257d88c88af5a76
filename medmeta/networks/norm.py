"""Batch norm for episodes: transductive by default, per-step running statistics on request.

Under :func:`composite_norms` (the task-vectorised inner loop) the layers here normalise with
``var_mean`` and elementwise ops, whose batching under ``torch.func.vmap`` is correct for
second-order meta-gradients; torch's fused ``batch_norm``/``instance_norm`` kernels get them wrong
under vmap (engineering notes, traps 1 and 13). Outside it they call the fused kernels, which are
exact task by task and 1.5-1.8x faster in a second-order meta-step on CPU.

A user's own model gets the same treatment: when it holds any module that medmeta does not know
to be batching-correct (torch's ``BatchNorm*``/``InstanceNorm*``/``LayerNorm``, or any module type
from outside ``torch.nn`` and medmeta, which might call the fused kernels itself),
:func:`composite_norms` also routes every ``F.batch_norm``/``F.instance_norm``/``F.layer_norm``
call made inside the block through :func:`batch_norm`/:func:`instance_norm`/:func:`layer_norm`,
the same functions written from ``var_mean`` ops (torch's fused layer norm with a weight is wrong
under vmap too). The
model object, its weights, buffers and ``state_dict`` are untouched. A call that would update
running statistics (a norm layer in training mode with ``track_running_stats=True``), or a direct
call of a fused kernel, raises :class:`NotVectorisable`; the algorithms then use the loop.

Two ways to normalise a *query* batch at evaluation:

* **transductive** (``running_stat_steps=0``, as in Finn et al., 2017): every forward uses the statistics
  of the batch it sees, so a query's prediction depends on the other queries of its episode.
* **running**: the layer keeps running mean and variance per inner step (Antoniou et al., 2019). During
  meta-training, forwards of query images after ``k`` inner updates (marked with
  :func:`query_statistics`) use their batch statistics and update slot ``k``; at evaluation those
  forwards use slot ``k``'s running statistics, so each query is predicted from the support set
  and itself alone. Support forwards always use the support batch's statistics (labelled data).
  Steps past the last slot reuse the last slot; a slot never updated falls back to the nearest
  updated slot, lower ones first (a learner whose loss uses its final step only fills that step's slot).

Why this module is longer than 300 lines: the norm layers medmeta builds and the composites that
make any user's norm layers exact under ``vmap`` must agree op for op, so they live together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_FUSED_NORM_KERNELS = (torch.batch_norm, torch.instance_norm, torch.native_batch_norm, torch.layer_norm, torch.native_layer_norm)


class NotVectorisable(RuntimeError):
    """Raised inside :func:`composite_norms` by a norm call that cannot run exactly under ``vmap``.

    ``buffer`` is the running-statistics tensor the call would have updated (``None`` if none), so
    that the caller can name the layer.
    """

    def __init__(self, message: str, buffer: Tensor | None = None) -> None:
        super().__init__(message)
        self.buffer = buffer


class EpisodeBatchNorm(nn.Module):
    """Batch norm over ``[B, C, *spatial]`` with optional running statistics per inner step.

    Args:
        channels: feature channels C.
        running_stat_steps: number of per-step statistic slots (0: transductive only, no buffers).
        momentum: running-average factor of each update.
        eps: added to the variance.
    """

    def __init__(self, channels: int, *, running_stat_steps: int = 0, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if running_stat_steps < 0:
            raise ValueError("running_stat_steps must be >= 0")
        self.channels, self.steps, self.momentum, self.eps = channels, running_stat_steps, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if running_stat_steps:
            self.register_buffer("running_mean", torch.zeros(running_stat_steps, channels))
            self.register_buffer("running_var", torch.ones(running_stat_steps, channels))
            self.register_buffer("num_batches_tracked", torch.zeros(running_stat_steps, dtype=torch.long))
        self.query_step: int | None = None  # set by ``query_statistics``
        self.composite = False  # set by ``composite_norms``

    def extra_repr(self) -> str:
        return f"{self.channels}, running_stat_steps={self.steps}, momentum={self.momentum}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with batch statistics, or with a step's running statistics for eval queries."""
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, ...], got {tuple(x.shape)}")
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 under autocast
        dims = [0, *range(2, x.dim())]
        use_running = self.steps > 0 and self.query_step is not None
        if use_running and not self.training:
            slot = self._eval_slot(self.query_step)
            mean, var = self.running_mean[slot], self.running_var[slot]
        elif not (use_running or self.composite):
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        else:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            if use_running:
                self._update(min(self.query_step, self.steps - 1), x, mean, var)
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)

    @torch.no_grad()
    def _update(self, slot: int, x: Tensor, mean: Tensor, var: Tensor) -> None:
        count = x.numel() // self.channels
        unbiased = var.detach() * (count / max(count - 1, 1))
        self.running_mean[slot].lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        self.running_var[slot].lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked[slot] += 1

    def _eval_slot(self, step: int) -> int:
        """Slot ``step`` (clamped), else the nearest updated slot, lower ones first."""
        slot = min(step, self.steps - 1)
        tracked = (self.num_batches_tracked > 0).nonzero().flatten().tolist()
        if not tracked or slot in tracked:
            return slot
        below = [s for s in tracked if s < slot]
        return below[-1] if below else tracked[0]


class EpisodeInstanceNorm(nn.Module):
    """Affine instance norm (statistics per sample and channel) from ``var_mean`` ops.

    Same function as ``nn.InstanceNorm2d/3d(affine=True)``; under :func:`composite_norms` it is
    computed from ``var_mean`` ops, whose batching under ``torch.func.vmap`` is correct for
    second-order meta-gradients (torch's instance norm runs through ``batch_norm`` and is not).
    """

    def __init__(self, channels: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.composite = False  # set by ``composite_norms``

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each sample and channel over its spatial elements."""
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, *spatial], got {tuple(x.shape)}")
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 under autocast
        if not self.composite:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0, keepdim=True)
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


@contextmanager
def query_statistics(model: nn.Module, step: int) -> Iterator[None]:
    """Mark forwards inside the block as query forwards after ``step`` inner updates.

    Only layers with running statistics react (see the module docstring); with transductive batch
    norm, group norm or instance norm the block changes nothing.
    """
    layers = [m for m in model.modules() if isinstance(m, EpisodeBatchNorm) and m.steps > 0]
    for layer in layers:
        layer.query_step = step
    try:
        yield
    finally:
        for layer in layers:
            layer.query_step = None


def _affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-channel ``weight``/``bias`` (dim 1)."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out.to(x.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from ``var_mean`` and elementwise ops (exact second order under ``vmap``).

    Same arguments and values; a call that would update running statistics (``training`` with
    running buffers) raises :class:`NotVectorisable`, since a buffer cannot be updated task by task
    inside ``vmap``.
    """
    if training and (running_mean is not None or running_var is not None):
        raise NotVectorisable(
            "batch norm in training mode with track_running_stats=True updates running statistics",
            running_mean if running_mean is not None else running_var,
        )
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm without running statistics needs training=True")
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if training:
        F._verify_batch_size(input.size())
        var, mean = torch.var_mean(input, dim=[0, *range(2, input.dim())], correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)  # type: ignore[union-attr]
    return _affine(input, mean, var, weight, bias, eps)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm`` from ``var_mean`` and elementwise ops (exact second order under ``vmap``).

    Same arguments and values; a call that would update running statistics (``use_input_stats``
    with running buffers) raises :class:`NotVectorisable`.
    """
    if use_input_stats and (running_mean is not None or running_var is not None):
        raise NotVectorisable(
            "instance norm in training mode with track_running_stats=True updates running statistics",
            running_mean if running_mean is not None else running_var,
        )
    if not use_input_stats and (running_mean is None or running_var is None):
        raise ValueError("instance_norm without running statistics needs use_input_stats=True")
    if use_input_stats:
        F._verify_spatial_size(input.size())
        var, mean = torch.var_mean(input, dim=tuple(range(2, input.dim())), correction=0, keepdim=True)
    else:
        shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
        mean, var = running_mean.view(shape), running_var.view(shape)  # type: ignore[union-attr]
    return _affine(input, mean, var, weight, bias, eps)


def layer_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...] | torch.Size,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` from ``var_mean`` and elementwise ops (exact second order under ``vmap``).

    torch's fused layer norm with an elementwise weight, the weight adapted per task, gave
    meta-gradients 5e-2 to 4e-1 off under vmap in float64 (without a weight it was exact).
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if tuple(input.shape[input.dim() - len(normalized_shape) :]) != tuple(normalized_shape):
        raise ValueError(f"layer_norm: normalized_shape {tuple(normalized_shape)} does not end {tuple(input.shape)}")
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    var, mean = torch.var_mean(input, dim=dims, correction=0, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(input.dtype)


_COMPOSITES: dict[Any, Any] = {F.batch_norm: batch_norm, F.instance_norm: instance_norm, F.layer_norm: layer_norm}


class _CompositeNormCalls(TorchFunctionMode):
    """Routes ``F.batch_norm``/``F.instance_norm``/``F.layer_norm`` through this module's composites."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        if func in _FUSED_NORM_KERNELS:
            raise NotVectorisable(f"a module calls torch.{func.__name__} directly")
        return func(*args, **kwargs)


def _known_batching_correct(module: nn.Module) -> bool:
    """Whether ``module``'s own forward is known never to call a fused batch/instance-norm kernel.

    medmeta's modules (whose norms follow ``composite``) and every ``torch.nn`` module except
    batch, instance and layer norm (group norm's and RMS norm's kernels measured exact under
    vmap). Any other type is unknown: it might call the kernels itself.
    """
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
        return False
    return type(module).__module__.startswith(("medmeta.", "torch.nn.modules."))


def needs_composite_calls(model: nn.Module) -> bool:
    """Whether ``model`` holds a module that :func:`composite_norms` must guard at call level."""
    return not all(_known_batching_correct(m) for m in model.modules())


def running_statistic_updates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The torch batch/instance-norm layers (name, layer) that would update running statistics now.

    Those are layers in training mode with ``track_running_stats=True``: their forward mutates
    buffers, which neither ``torch.func.grad`` nor ``vmap`` allow.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]


@contextmanager
def composite_norms(model: nn.Module) -> Iterator[None]:
    """Inside the block, batch and instance norm use ``var_mean`` ops (correct under ``vmap``).

    medmeta's norm layers switch to their composite path; if ``model`` holds torch batch, instance
    or layer norms or module types medmeta does not know, every ``F.batch_norm``/
    ``F.instance_norm``/``F.layer_norm`` call in the block is also computed by this module's
    composites (and a call that cannot be, such as a running-statistics update, raises
    :class:`NotVectorisable`).
    """
    layers = [m for m in model.modules() if isinstance(m, (EpisodeBatchNorm, EpisodeInstanceNorm))]
    previous = [layer.composite for layer in layers]
    for layer in layers:
        layer.composite = True
    try:
        with _CompositeNormCalls() if needs_composite_calls(model) else nullcontext():
            yield
    finally:
        for layer, value in zip(layers, previous):
            layer.composite = value


def set_running_stat_slots(model: nn.Module, slots: int) -> None:
    """Give every batch-norm layer of ``model`` that keeps running statistics ``slots`` fresh per-step slots.

    The meta-learner decides the number (one per query step it runs); the backbone is built with one.
    """
    for layer in model.modules():
        if isinstance(layer, EpisodeBatchNorm) and layer.steps > 0 and layer.steps != slots:
            if slots < 1:
                raise ValueError(f"running statistics need at least one slot, got {slots}")
            device = layer.running_mean.device
            layer.steps = slots
            layer.running_mean = torch.zeros(slots, layer.channels, device=device)
            layer.running_var = torch.ones(slots, layer.channels, device=device)
            layer.num_batches_tracked = torch.zeros(slots, dtype=torch.long, device=device)


def uses_running_statistics(model: nn.Module) -> bool:
    """Whether any batch-norm layer of ``model`` keeps per-step running statistics."""
    return any(isinstance(m, EpisodeBatchNorm) and m.steps > 0 for m in model.modules())


def norm_kinds(model: nn.Module) -> str:
    """The kinds of non-batch normalisation layer in ``model``, in words (``"group norm"``), or ``"no norm layers"``."""
    kinds = {"GroupNorm": "group norm", "LayerNorm": "layer norm"}
    found = {kinds.get(type(m).__name__, "instance norm" if "InstanceNorm" in type(m).__name__ else "") for m in model.modules()}
    return " and ".join(sorted(found - {""})) or "no norm layers"


def describe_normalisation(model: nn.Module, norm_mode: str, transductive_batches: str) -> str:
    """How query images are normalised at evaluation (in eval mode), for reports (``metrics.json``, ``diagnose``).

    ``transductive_batches`` is what the learner's batch statistics are computed over. A torch batch-norm
    layer of a user's backbone normalises in eval mode with its running statistics when it holds them
    (``track_running_stats=True``, torch's default), support and query images alike, and with batch
    statistics (transductive) otherwise. A model mixing kinds gets each named, the transductive one
    first: the label starts with "transductive" exactly when a query depends on the other queries.
    """
    episode = any(isinstance(m, EpisodeBatchNorm) for m in model.modules())
    torch_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not episode and not torch_layers:
        return f"{norm_kinds(model)} (per-sample or per-group statistics, non-transductive)"
    own_running = sum(m.running_mean is not None for m in torch_layers)  # what torch's eval mode normalises with
    transductive = []  # the layers normalising with batch statistics
    if episode and norm_mode != "running":
        transductive.append("medmeta's batch-norm layers")
    if own_running < len(torch_layers):
        transductive.append("torch batch-norm layers without running statistics")
    kinds = []  # (how, which layers: named when the model mixes kinds)
    if transductive:
        kinds.append((f"transductive (batch statistics of {transductive_batches})", " and ".join(transductive)))
    if episode and norm_mode == "running":
        kinds.append((
            "running (per-inner-step running batch-norm statistics from meta-training for query images; support "
            "images use their own batch statistics; non-transductive)", "medmeta's batch-norm layers",
        ))  # fmt: skip
    if own_running:
        kinds.append((
            "running (the running statistics of the backbone's own torch batch-norm layers, in eval mode, for "
            "support and query images alike; each query is normalised from itself alone)", "",
        ))  # fmt: skip
    if len(kinds) == 1:
        return kinds[0][0]
    return "; ".join(f"{how} in {layers}" if layers else how for how, layers in kinds)
