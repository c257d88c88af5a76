"""Second-order MAML meta-step speed: medmeta against higher and TorchOpt, side by side.

Usage:
    python benchmarks/maml_speed.py [--device cuda] [--cases 84x84x3 T4] [--repeats 5] [--json out.json]
    python benchmarks/maml_speed.py --sweep --plot tasks_per_s.png   # tasks/s against the meta-batch size
    python benchmarks/maml_speed.py --quick --device cpu             # smoke test, seconds

In one process, on the same device, with the same Conv-4 weights and the same random episodes,
one meta-step (query loss of every task after 5 plain-SGD inner steps at lr 0.4, mean over the
tasks, then ``torch.autograd.grad`` of it with respect to the weights, second order) of:

* medmeta ``MAML`` with ``task_parallel="loop"`` (the reference), ``"vmap"``, ``"vmap"`` under
  bf16 autocast, and the loop inside ``torch.compile`` (allowed to fail: then skipped);
* ``higher.innerloop_ctx`` and ``torchopt.MetaSGD`` (the ``bench`` extra; skipped when missing).

Every implementation's meta-gradient is first compared with the reference (relative L2 norm of
the difference, float32 weights). Next to it, the rounding floor: how far the reference itself
moves when the weights are nudged by one fp32 ulp or rounded to bf16 (this meta-gradient is very
sensitive: on the CPU, 28x28 1-shot T=4 at 5 inner steps and 64 channels, the floor was 4e-4 in fp32
and 0.3 in bf16; on an H200 at T=32, 1.4e-3 in fp32). An implementation is flagged beyond 1e-4 (5e-2
for bf16) or twice its precision's floor, whichever is larger: rounding alone moves the reference
that far, so a smaller difference cannot tell a wrong implementation from a reordered sum. ``--check-fp64`` also compares every fp32 implementation with
the loop in float64, where the same function agrees to ~1e-14 (flagged beyond 1e-9). TF32 stays
off on CUDA unless ``--tf32``.

Then each runs ``--warmup`` meta-steps and ``--repeats`` timed ones (median reported): on the CPU
round-robin over the implementations, so that none is favoured by its position; on CUDA one
implementation after the other, each freed before the next (a CUDA graph holds its memory pool).
Then one more step each for its peak memory: on CUDA the allocator's peak reserved bytes above
what it held before the implementation was built (cuDNN autotuning on), on the CPU the growth of
the resident set size (sampled from /proc/self/statm). Batch norm is medmeta's ``EpisodeBatchNorm``
(batch statistics only), so all compute the same function. An implementation that fails (out of
memory, say) is reported and the others go on.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.algorithms import MAML
from medmeta.algorithms.cuda_graph import GraphedOuterLoss
from medmeta.networks import Conv4

IMPLEMENTATIONS = (
    "medmeta-loop", "medmeta-checkpoint", "medmeta-vmap", "medmeta-vmap-bf16", "medmeta-vmap-graph",
    "medmeta-loop-graph", "medmeta-vmap-bf16-graph", "medmeta-compiled", "higher", "torchopt",
)  # fmt: skip
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
FLOOR_FACTOR = 2  # the tolerance is at least this many rounding floors (see the module docstring)
FP64_TOLERANCE = 1e-9
SWEEP = (1, 2, 4, 8, 16, 32)


class Episodes(NamedTuple):
    """A meta-batch: support ``[T, N*K, C, *spatial]`` and query ``[T, N*Q, C, *spatial]`` with labels."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


MetaStep = Callable[[Episodes], tuple[Tensor, ...]]


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One benchmark setting: N-way K-shot episodes of ``channels x size^spatial_dims`` images."""

    size: int
    channels: int
    shots: int
    meta_batch: int
    spatial_dims: int = 2
    n_way: int = 5
    queries: int = 15
    inner_steps: int = 5
    hidden: int = 64
    inner_lr: float = 0.4

    @property
    def name(self) -> str:
        side = "x".join([str(self.size)] * self.spatial_dims)
        return f"{self.spatial_dims}d-{side}x{self.channels}-{self.n_way}w{self.shots}s{self.queries}q-T{self.meta_batch}"


def default_cases() -> list[Case]:
    """The full matrix: 84x84x3 and 28x28x1, 1- and 5-shot, meta-batch 4 and 32, and 3D 32^3x1.

    Inner learning rates as in the MAML paper: 0.01 for 84x84x3 (MiniImagenet), 0.4 for 28x28x1
    (Omniglot); at 0.4 the 84x84 inner loop diverges and one fp32 ulp moves the meta-gradient by ~5%.
    """
    cases = [
        Case(size=size, channels=channels, shots=shots, meta_batch=tasks, inner_lr=lr)
        for size, channels, lr in ((84, 3, 0.01), (28, 1, 0.4)) for shots in (1, 5) for tasks in (4, 32)
    ]  # fmt: skip
    # 5 queries per class in 3D (as in data_pipeline.py): 15 would need tens of GB per task.
    return [*cases, Case(size=32, channels=1, shots=1, meta_batch=4, spatial_dims=3, queries=5, inner_lr=0.01)]


QUICK_CASE = Case(size=28, channels=1, shots=1, meta_batch=2, inner_steps=2, hidden=8)


def make_episodes(case: Case, device: torch.device, seed: int = 0) -> Episodes:
    """Random images with balanced labels, the same for every implementation."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.channels,) + (case.size,) * case.spatial_dims

    def labels(per_class: int) -> Tensor:
        return torch.arange(case.n_way).repeat_interleave(per_class).repeat(case.meta_batch, 1)

    support_x = torch.randn(case.meta_batch, case.n_way * case.shots, *shape, generator=g)
    query_x = torch.randn(case.meta_batch, case.n_way * case.queries, *shape, generator=g)
    return Episodes(*(t.to(device) for t in (support_x, labels(case.shots), query_x, labels(case.queries))))


def make_model(case: Case, device: torch.device, seed: int = 0) -> nn.Module:
    """Conv-4 with transductive ``EpisodeBatchNorm``, seeded weights."""
    torch.manual_seed(seed)
    model = Conv4(in_channels=case.channels, n_way=case.n_way, hidden_channels=case.hidden,
                  spatial_dims=case.spatial_dims, norm="batch", image_size=case.size)  # fmt: skip
    return model.to(device).train()


def medmeta_step(
    model: nn.Module, case: Case, task_parallel: str, bf16: bool = False, checkpoint: bool = False, graph: bool = False
) -> MetaStep:
    """``MAML.outer_loss`` then ``autograd.grad``, with ``task_parallel``, optionally bf16 autocast,
    inner-step checkpointing, or replayed as CUDA graphs (``GraphedOuterLoss``, as ``cuda_graph``)."""
    algo = MAML(model, inner_lr=case.inner_lr, inner_steps=case.inner_steps, task_parallel=task_parallel,
                checkpoint_inner_steps=checkpoint)  # fmt: skip
    params = tuple(model.parameters())
    outer = GraphedOuterLoss(algo) if graph else algo.outer_loss_and_logits

    def step(episodes: Episodes) -> tuple[Tensor, ...]:
        device_type = episodes.support_x.device.type
        if graph and device_type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            return torch.autograd.grad(outer(*episodes)[0], params)

    return step


def compiled_step(model: nn.Module, case: Case, backend: str) -> MetaStep:
    """The loop meta-step inside ``torch.compile``; a failure of the first call becomes a skip."""
    torch._dynamo.reset()  # a fresh cache per case: no silent fallback at the recompile limit
    eager = medmeta_step(model, case, "loop")

    def meta_step(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, ...]:
        return eager(Episodes(support_x, support_y, query_x, query_y))

    compiled = torch.compile(meta_step, backend=backend)
    compiled_once = False

    def step(episodes: Episodes) -> tuple[Tensor, ...]:
        nonlocal compiled_once
        if compiled_once:
            return compiled(*episodes)
        try:
            grads = compiled(*episodes)
        except Exception as error:  # noqa: BLE001 - any compiler failure is a reason to skip
            raise Skip(f"torch.compile ({backend}) failed: {type(error).__name__}: {_first_line(error)}") from error
        compiled_once = True
        return grads

    return step


def import_peer(name: str) -> Any:
    """The peer library, or a skip saying why it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - ImportError, or a peer broken against this torch
        raise Skip(f"{name} not usable: {type(error).__name__}: {_first_line(error)} (pip install -e '.[bench]')") from error


def higher_step(model: nn.Module, case: Case) -> MetaStep:
    """``higher.innerloop_ctx`` over the tasks, differentiable SGD, mean query loss."""
    higher = import_peer("higher")
    params = tuple(model.parameters())
    inner_opt = torch.optim.SGD(model.parameters(), lr=case.inner_lr)

    def step(episodes: Episodes) -> tuple[Tensor, ...]:
        losses = []
        for sx, sy, qx, qy in zip(*episodes, strict=True):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (
                fmodel, diffopt,
            ):  # fmt: skip
                for _ in range(case.inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(sx), sy))
                losses.append(F.cross_entropy(fmodel(qx), qy))
        return torch.autograd.grad(torch.stack(losses).mean(), params)

    return step


def torchopt_step(model: nn.Module, case: Case) -> MetaStep:
    """``torchopt.MetaSGD`` on the module, state extracted and recovered per task (TorchOpt's MAML example).

    Unlike the example (one backward per task), the query losses are averaged and differentiated
    once, as medmeta does, so all graphs are alive at the same time in both.
    """
    torchopt = import_peer("torchopt")
    params = tuple(model.parameters())
    inner_opt = torchopt.MetaSGD(model, lr=case.inner_lr)

    def step(episodes: Episodes) -> tuple[Tensor, ...]:
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(inner_opt)
        losses = []
        for sx, sy, qx, qy in zip(*episodes, strict=True):
            try:
                for _ in range(case.inner_steps):
                    inner_opt.step(F.cross_entropy(model(sx), sy))
                losses.append(F.cross_entropy(model(qx), qy))
            finally:  # the shared model gets its own parameters back, whatever happened
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
        return torch.autograd.grad(torch.stack(losses).mean(), params)

    return step


def build_step(name: str, model: nn.Module, case: Case, compile_backend: str | None) -> MetaStep:
    """The meta-step of implementation ``name`` (raises ``Skip`` when it cannot run)."""
    if name == "medmeta-loop":
        return medmeta_step(model, case, "loop")
    if name == "medmeta-checkpoint":
        return medmeta_step(model, case, "loop", checkpoint=True)
    if name == "medmeta-vmap":
        return medmeta_step(model, case, "vmap")
    if name == "medmeta-vmap-bf16":
        return medmeta_step(model, case, "vmap", bf16=True)
    if name == "medmeta-vmap-graph":
        return medmeta_step(model, case, "vmap", graph=True)
    if name == "medmeta-loop-graph":
        return medmeta_step(model, case, "loop", graph=True)
    if name == "medmeta-vmap-bf16-graph":
        return medmeta_step(model, case, "vmap", bf16=True, graph=True)
    if name == "medmeta-compiled":
        if compile_backend is None:
            raise Skip("--quick: inductor takes over a minute to compile on CPU (pass --compile-backend)")
        return compiled_step(model, case, compile_backend)
    if name == "higher":
        return higher_step(model, case)
    if name == "torchopt":
        return torchopt_step(model, case)
    raise ValueError(f"unknown implementation {name!r}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flatten(grads: tuple[Tensor, ...]) -> Tensor:
    """One float64 vector of all gradients (exact for float32 ones), on the CPU."""
    return torch.cat([g.detach().reshape(-1).double().cpu() for g in grads])


def relative_difference(grads: tuple[Tensor, ...], reference: Tensor) -> float:
    """``||g - ref|| / ||ref||`` of the flattened meta-gradients."""
    return float((flatten(grads) - reference).norm() / reference.norm())


def sensitivity(model: nn.Module, case: Case, episodes: Episodes, reference: Tensor) -> dict[str, float]:
    """How far the loop's own meta-gradient moves when θ is nudged by one fp32 ulp or rounded to bf16.

    A floor for the agreement check: rounding alone moves the meta-gradient by about these amounts,
    so an implementation that differs by no more than them computes the same function.
    """
    floors = {}
    generator = torch.Generator().manual_seed(1)
    for precision in ("fp32", "bf16"):
        nudged = copy.deepcopy(model)
        with torch.no_grad():
            for p in nudged.parameters():
                if precision == "bf16":
                    p.copy_(p.to(torch.bfloat16))
                else:
                    p.mul_(1 + 2**-23 * torch.randn(p.shape, generator=generator).to(p.device))
        floors[f"{precision}_floor"] = relative_difference(medmeta_step(nudged, case, "loop")(episodes), reference)
    return floors


def time_step(step: MetaStep, episodes: Episodes, device: torch.device) -> float:
    """Seconds of one meta-step, device work included."""
    start = time.perf_counter()
    step(episodes)
    synchronize(device)
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_memory(device: torch.device) -> None:
    """Drop garbage and hand freed memory back (so the next peak is measured from a low base)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def memory_kind(device: torch.device) -> str:
    """What the peak-memory column measures on ``device``."""
    if device.type == "cuda":
        return ("CUDA: peak torch.cuda.max_memory_reserved during one meta-step, less what was reserved before the "
                "implementation was built (so a CUDA graph's memory pool counts)")
    return "CPU: peak resident-set growth during one meta-step, /proc/self/statm sampled every 1 ms"


def peak_memory_mb(step: MetaStep, episodes: Episodes, device: torch.device, base: int = 0) -> float | None:
    """Peak memory of one meta-step in MiB (see ``memory_kind``); ``None`` where not measurable.

    On CUDA: the allocator's peak reserved bytes during the step, less ``base`` (what it held
    before the implementation was built), so that a CUDA graph's private pool counts too.
    """
    _release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step(episodes)
        synchronize(device)
        return (torch.cuda.max_memory_reserved(device) - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step(episodes)
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], _rss_bytes()) - base) / 2**20


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def fp64_differences(
    model: nn.Module, case: Case, episodes: Episodes, names: list[str], compile_backend: str | None
) -> dict[str, float]:
    """Each implementation's relative difference from the loop with weights and episodes in float64.

    In float64 rounding no longer hides a wrong meta-gradient: the same function agrees to ~1e-14.
    """
    model64 = copy.deepcopy(model).double()
    episodes64 = Episodes(*(t.double() if t.is_floating_point() else t for t in episodes))
    reference = flatten(medmeta_step(model64, case, "loop")(episodes64))
    return {name: relative_difference(build_step(name, model64, case, compile_backend)(episodes64), reference) for name in names}


def prepare(
    name: str, model: nn.Module, case: Case, episodes: Episodes, device: torch.device, *, warmup: int,
    compile_backend: str | None, reference: Tensor | None,
) -> tuple[MetaStep, dict[str, Any]]:  # fmt: skip
    """One implementation's meta-step, its first-call time, agreement with the reference, warm-up."""
    row: dict[str, Any] = {}
    step = build_step(name, model, case, compile_backend)
    start = time.perf_counter()
    grads = step(episodes)  # first call: compiles where there is something to compile
    synchronize(device)
    row["first_step_s"] = time.perf_counter() - start
    if reference is not None:
        row["rel_diff"] = relative_difference(grads, reference)
    del grads
    for _ in range(warmup):
        step(episodes)
    synchronize(device)
    return step, row


def _failure(error: Exception) -> dict[str, str]:
    return {"status": "oom" if _is_oom(error) else "error", "reason": f"{type(error).__name__}: {_first_line(error)}"}


def _reserved_bytes(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds after releasing what it can (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    _release_memory(device)
    return torch.cuda.memory_reserved(device)


def _time_and_measure(
    rows: list[dict[str, Any]], steps: dict[str, MetaStep], episodes: Episodes, device: torch.device, case: Case,
    repeats: int, base: int,
) -> None:  # fmt: skip
    """``repeats`` timed meta-steps of every row's implementation, round-robin, then its peak memory."""
    for _ in range(repeats):
        for row in rows:
            if row["status"] != "ok":
                continue
            try:
                row["step_s"].append(time_step(steps[row["implementation"]], episodes, device))
            except Exception as error:  # noqa: BLE001
                row.update(_failure(error))
    for row in rows:
        if row["status"] == "ok":
            row.update(steps_per_s=1 / statistics.median(row["step_s"]))
            row["tasks_per_s"] = case.meta_batch * row["steps_per_s"]
            try:
                row["peak_memory_mb"] = peak_memory_mb(steps[row["implementation"]], episodes, device, base)
            except Exception as error:  # noqa: BLE001
                row.update(_failure(error))
        _release_memory(device)


def run_case(
    case: Case, device: torch.device, implementations: list[str], *, warmup: int, repeats: int,
    compile_backend: str | None, check: bool = True, check_fp64: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every implementation on one case: agreement with the loop reference, timing and memory.

    A reference that fails (out of memory, say) leaves the case timed without the check.
    """
    model, episodes = make_model(case, device), make_episodes(case, device)
    reference, common = None, {"case": case.name, **asdict(case)}
    try:
        if check:
            reference = flatten(medmeta_step(model, case, "loop")(episodes))
            common.update(sensitivity(model, case, episodes, reference))
    except Exception as error:  # noqa: BLE001
        reference, common["check_failed"] = None, _failure(error)["reason"]
    rows, steps = [], {}
    # On the CPU the timed steps go round-robin over the implementations, so that none is favoured
    # by its position (caches, clock boost). On CUDA each implementation is timed and then freed in
    # turn: CUDA graphs hold their memory pool while alive, which would crowd out the others.
    sequential = device.type == "cuda"
    for name in implementations:
        precision = "bf16" if "bf16" in name else "fp32"
        row = {**common, "implementation": name, "precision": precision, "status": "ok"}
        base = _reserved_bytes(device)
        try:
            steps[name], measured = prepare(name, model, case, episodes, device, warmup=warmup,
                                            compile_backend=compile_backend, reference=reference)  # fmt: skip
            row.update(measured, step_s=[])
        except Skip as reason:
            row.update(status="skipped", reason=str(reason))
        except Exception as error:  # noqa: BLE001 - report and go on with the other implementations
            row.update(_failure(error))
        if "rel_diff" in row:
            floor = row[f"{precision}_floor"]
            row.update(tolerance=max(TOLERANCE[precision], FLOOR_FACTOR * floor), floor=floor)
            row["agrees"] = row["rel_diff"] <= row["tolerance"]
        rows.append(row)
        if sequential and name in steps:
            _time_and_measure([row], steps, episodes, device, case, repeats, base)
            steps.clear()
            _release_memory(device)
    if not sequential:
        _time_and_measure([r for r in rows if r["implementation"] in steps], steps, episodes, device, case, repeats, 0)
        steps.clear()
    if reference is not None and check_fp64:  # after the timings, so the float64 copies never count in them
        names = [r["implementation"] for r in rows if r["status"] == "ok" and r["precision"] == "fp32"]
        try:
            differences = fp64_differences(model, case, episodes, names, compile_backend)
        except Exception as error:  # noqa: BLE001
            for row in rows:
                row["fp64_failed"] = _failure(error)["reason"]
        else:
            for row in rows:
                if row["implementation"] in differences:
                    row["rel_diff_fp64"] = differences[row["implementation"]]
                    row["agrees_fp64"] = row["rel_diff_fp64"] <= FP64_TOLERANCE
        _release_memory(device)
    return rows


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """A rich table of the results, one row per (case, implementation)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    caption = None
    if rows and "fp32_floor" in rows[0]:
        caption = (f"rounding floor: θ nudged one fp32 ulp moves the loop's meta-gradient by {rows[0]['fp32_floor']:.1e}, "
                   f"θ rounded to bf16 by {rows[0]['bf16_floor']:.1e}")  # fmt: skip
    if rows and "check_failed" in rows[0]:
        caption = escape(f"no gradient check: the reference failed ({rows[0]['check_failed']})")
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    fp64 = any("rel_diff_fp64" in row for row in rows)
    checks = ("rel L2 diff", "fp64 rel diff") if fp64 else ("rel L2 diff",)
    columns = ("case", "implementation", *checks, "steps/s", "tasks/s", "peak MiB", "note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "implementation", "note") else "right")
    for row in rows:
        diff_text = _fmt(row.get("rel_diff"), ".1e") + ("" if row.get("agrees", True) else f" > {row['tolerance']:.0e} !")
        fp64_text = _fmt(row.get("rel_diff_fp64"), ".1e") + ("" if row.get("agrees_fp64", True) else f" > {FP64_TOLERANCE:.0e} !")
        note = row.get("reason", "") if row["status"] != "ok" else ""
        if row["implementation"] == "medmeta-compiled" and row["status"] == "ok":
            note = f"compile + first step {row['first_step_s']:.0f} s"
        table.add_row(
            row["case"], row["implementation"], diff_text, *((fp64_text,) if fp64 else ()), _fmt(row.get("steps_per_s"), ".2f"),
            _fmt(row.get("tasks_per_s"), ".1f"), _fmt(row.get("peak_memory_mb"), ".0f"),
            escape(note if row["status"] == "ok" else f"{row['status']}: {note}"),
        )  # fmt: skip
    Console(width=200).print(table)


def plot_sweep(rows: list[dict[str, Any]], path: Path, device: str) -> None:
    """Tasks per second against the meta-batch size, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in IMPLEMENTATIONS:
        points = sorted((r["meta_batch"], r["tasks_per_s"]) for r in rows if r["implementation"] == name and r["status"] == "ok")
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["meta_batch"] for r in rows})
    ax.set_xticks(sizes, [str(t) for t in sizes])
    ax.minorticks_off()
    ax.set_xlabel("meta-batch size (tasks)")
    ax.set_ylabel("tasks / s (second-order meta-step)")
    ax.set_title(f"{rows[0]['case'].rsplit('-T', 1)[0] if rows else ''} on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def select_cases(filters: list[str] | None) -> list[Case]:
    """The default cases whose name contains every filter string."""
    cases = default_cases()
    return [c for c in cases if all(f in c.name for f in filters)] if filters else cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", metavar="SUBSTRING", help="keep cases whose name contains all of these")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--inner-steps", type=int, help="override the cases' 5 inner steps (memory against steps)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one tiny case (28x28x1, 1-shot, T=2, 2 inner steps, 8 channels)")
    parser.add_argument("--sweep", nargs="*", type=int, metavar="T",
                        help="also time the 84x84x3 1-shot case (--quick: the quick case) at these meta-batch sizes "
                             f"(default {' '.join(map(str, SWEEP))})")  # fmt: skip
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; off with --quick)")
    parser.add_argument("--check-fp64", action="store_true",
                        help="also compare every fp32 implementation with the loop in float64 (exact; 2x memory)")  # fmt: skip
    parser.add_argument("--tf32", action="store_true", help="allow TF32 convolutions and matmuls on CUDA (off: exact fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of tasks/s against meta-batch size (needs --sweep)")
    args = parser.parse_args()
    if args.plot and args.sweep is None:
        parser.error("--plot needs --sweep")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest convolution algorithms, for every implementation
    if args.quick:
        cases, repeats, warmup, sweep_base = [QUICK_CASE], 1, 1, QUICK_CASE
    else:
        cases, repeats, warmup = select_cases(args.cases), args.repeats, args.warmup
        sweep_base = Case(size=84, channels=3, shots=1, meta_batch=1, inner_lr=0.01)
    if args.inner_steps is not None:
        cases = [replace(case, inner_steps=args.inner_steps) for case in cases]
    backend = args.compile_backend or (None if args.quick else "inductor")
    header = {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "memory": memory_kind(device), "quick": args.quick,
        "warmup": warmup, "repeats": repeats, "compile_backend": backend, "cudnn_benchmark": device.type == "cuda",
        "tf32": args.tf32, "check_fp64": args.check_fp64,
    }  # fmt: skip
    print(f"second-order MAML meta-step on {header['device_name']} ({device.type}), torch {torch.__version__}, "
          f"{header['threads']} threads, TF32 {'on' if args.tf32 else 'off'}")  # fmt: skip
    print(f"peak memory = {header['memory']}; {repeats} timed steps after {warmup} warm-up, median", flush=True)
    results: list[dict[str, Any]] = []
    for case in cases:
        results += run_case(case, device, args.implementations, warmup=warmup, repeats=repeats, compile_backend=backend,
                            check_fp64=args.check_fp64)  # fmt: skip
        print_table([r for r in results if r["case"] == case.name], case.name)
        if args.json:  # after every case, so that a run cut short keeps what it measured
            args.json.write_text(json.dumps({**header, "results": results, "sweep": []}, indent=2) + "\n")
    sweep: list[dict[str, Any]] = []
    if args.sweep is not None:
        for tasks in args.sweep or SWEEP:
            rows = run_case(replace(sweep_base, meta_batch=tasks), device, args.implementations, warmup=warmup,
                            repeats=repeats, compile_backend=backend, check=False)  # fmt: skip
            print_table(rows, f"meta-batch sweep, T={tasks} (no gradient check)")
            sweep += rows
            if args.json:
                args.json.write_text(json.dumps({**header, "results": results, "sweep": sweep}, indent=2) + "\n")
    disagreeing = [f"{r['case']} {r['implementation']} {r['rel_diff']:.1e} (rounding floor {r['floor']:.1e})"
                   for r in results if r.get("agrees") is False]  # fmt: skip
    tolerances = " / ".join(f"{v:.0e} {k}" for k, v in TOLERANCE.items())
    print(f"meta-gradients beyond {tolerances} (or {FLOOR_FACTOR}x the rounding floor) of medmeta-loop: "
          f"{'; '.join(disagreeing) or 'none'}")
    if args.check_fp64:
        wrong = [f"{r['case']} {r['implementation']} {r['rel_diff_fp64']:.1e}" for r in results if r.get("agrees_fp64") is False]
        print(f"in float64, meta-gradients beyond {FP64_TOLERANCE:.0e} of medmeta-loop: {'; '.join(wrong) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({**header, "results": results, "sweep": sweep}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(sweep, args.plot, header["device_name"])
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
