"""Second-order MAML on ResNet backbones: peak memory and meta-step time on the CPU, with and without checkpointing.

Usage:
    python benchmarks/backbone_memory.py --threads 1 --json backbone_memory.json
    python benchmarks/backbone_memory.py --quick                 # 16x16 images, 1 task: seconds
    python benchmarks/backbone_memory.py --backbones resnet18 --budget-gib 8

One meta-step of medmeta's ``MAML`` (second order, 5 inner SGD steps at lr 0.05,
``task_parallel="loop"``, mean query loss over the tasks, then ``torch.autograd.grad`` of it with
respect to the weights) on random 4-way 5-shot 15-query episodes of 64x64 3-channel images,
meta-batch 4, float32, transductive batch norm (medmeta's ``EpisodeBatchNorm``), for each backbone
in :data:`BACKBONES`, once with stored inner steps and once with ``checkpoint_inner_steps=True``.

Each (backbone, mode) runs in its own subprocess, so each peak is its own. Peak memory is
``benchmarks/maml_speed.py``'s sampler: the growth of the resident set during the step
(``/proc/self/statm`` every 1 ms); the process's own peak RSS (``ru_maxrss``, imports included)
is reported too. The step time is that same first meta-step's wall time. Each subprocess may
grow its address space by at most ``--budget-gib`` (and by no more than the memory available when
it starts, less 1 GiB): a step that needs more fails with an allocation error and is reported as
not fitting within that budget, instead of pushing the machine into its OOM killer (which, if it
comes to that, is told to take the benchmark first: ``oom_score_adj`` 1000).

The checkpointed meta-gradient is compared with the stored one, computed in the same subprocess
after the measured step and task by task (exact: the outer loss is the mean of the tasks' losses,
and one task's stored graph needs a quarter of the memory), as the relative L2 norm of the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_speed import (  # noqa: E402 - the speed benchmark's episodes, meta-step and memory sampler
    TOLERANCE,
    Case,
    Episodes,
    device_name,
    flatten,
    make_episodes,
    medmeta_step,
    peak_memory_mb,
    relative_difference,
)

from medmeta.networks import build_backbone  # noqa: E402

BACKBONES: dict[str, dict[str, Any]] = {
    "conv4-32": {"class_path": "conv4", "init_args": {"hidden_channels": 32}},  # the reference
    "resnet12-64": {"class_path": "resnet12", "init_args": {}},  # default widths 64-128-256-512
    "resnet12-32": {"class_path": "resnet12", "init_args": {"hidden_channels": 32}},  # 32-64-128-256
    "resnet18": {"class_path": "resnet18", "init_args": {}},  # torchvision widths 64-128-256-512
}
MODES = ("stored", "checkpointed")
CASE = Case(size=64, channels=3, shots=5, meta_batch=4, n_way=4, queries=15, inner_steps=5, inner_lr=0.05)
QUICK_CASE = replace(CASE, size=16, meta_batch=1)
DEFAULT_BUDGET_GIB = 20.0


def make_backbone(name: str, case: Case, seed: int = 0) -> torch.nn.Module:
    """Backbone ``name`` of :data:`BACKBONES` for ``case``'s episodes, seeded, in training mode."""
    torch.manual_seed(seed)
    return build_backbone(BACKBONES[name], in_channels=case.channels, n_way=case.n_way, spatial_dims=2,
                          image_size=case.size).train()  # fmt: skip


def limit_address_space(budget_gib: float) -> float:
    """Let this process's address space grow by at most ``budget_gib``, or what the machine has available less
    1 GiB if that is less, from now on (allocations beyond it fail); returns the budget applied, in GiB."""
    budget_gib = min(budget_gib, meminfo_gib("MemAvailable") - 1.0)
    try:  # should the machine run out anyway, the kernel's OOM killer takes this process, not another job
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = size + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return budget_gib


def stored_meta_gradient_by_task(model: torch.nn.Module, case: Case, episodes: Episodes) -> Tensor:
    """The stored (not checkpointed) meta-gradient of the mean over tasks, one task's graph at a time."""
    one = replace(case, meta_batch=1)
    total = None
    for task in range(episodes.support_x.shape[0]):
        grads = flatten(medmeta_step(model, one, "loop")(Episodes(*(t[task : task + 1] for t in episodes))))
        total = grads if total is None else total + grads
    return total / episodes.support_x.shape[0]


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(s in text for s in ("can't allocate memory", "out of memory", "bad_alloc"))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def measure(name: str, mode: str, case: Case, budget_gib: float) -> dict[str, Any]:
    """One meta-step of ``name`` in ``mode`` in this process: peak RSS growth, time, and the gradient check."""
    model = make_backbone(name, case)
    episodes = make_episodes(case, torch.device("cpu"))
    row: dict[str, Any] = {"backbone": name, "mode": mode, "status": "ok",
                           "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    step = medmeta_step(model, case, "loop", checkpoint=mode == "checkpointed")
    result: list[tuple[Tensor, ...]] = []
    row["budget_gib"] = limit_address_space(budget_gib)
    start = time.perf_counter()
    try:
        row["peak_growth_mib"] = peak_memory_mb(lambda e: result.append(step(e)), episodes, torch.device("cpu"))
        row["step_s"] = time.perf_counter() - start
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        row.update(status="out of memory", reason=_first_line(error), failed_after_s=time.perf_counter() - start)
    if mode == "checkpointed" and result:
        try:
            row["rel_diff"] = relative_difference(result[0], stored_meta_gradient_by_task(model, case, episodes))
            row["agrees"] = row["rel_diff"] <= TOLERANCE["fp32"]
        except (RuntimeError, MemoryError) as error:
            if not _out_of_memory(error):
                raise
            row["check_failed"] = _first_line(error)
    row["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def meminfo_gib(field: str) -> float:
    """A field of /proc/meminfo (``MemTotal``, ``MemAvailable``), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/meminfo")


def run_subprocess(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter; a crash (e.g. killed) becomes a failed row."""
    command = [sys.executable, __file__, "--single", name, mode, "--budget-gib", str(args.budget_gib)]
    command += ["--quick"] if args.quick else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--meta-batch", str(args.meta_batch)] if args.meta_batch else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if done.returncode == -9:
        reason = "killed by SIGKILL (likely the kernel's OOM killer: the machine ran out of memory)"
    else:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:300]
    return {"backbone": name, "mode": mode, "status": "failed", "reason": reason}


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else "-"


def markdown_table(rows: list[dict[str, Any]], total_gib: float) -> str:
    """One row per (backbone, mode): parameters, peak RSS growth, process peak (and its share of ``total_gib``),
    step time, gradient check."""
    lines = [f"| backbone | parameters | inner steps | peak RSS growth | process peak RSS (share of {total_gib:.1f} GiB) | "
             "meta-step | checkpointed vs stored (rel. L2) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row["status"] == "ok":
            memory = f"{row['peak_growth_mib'] / 1024:.2f} GiB"
            peak = f"{row['process_peak_rss_mib'] / 1024:.2f} GiB ({row['process_peak_rss_mib'] / 1024 / total_gib:.0%})"
            seconds = f"{row['step_s']:.1f} s"
        else:
            memory = f"> {row['budget_gib']:.1f} GiB budget" if row["status"] == "out of memory" else row["status"]
            peak = f"{row['process_peak_rss_mib'] / 1024:.2f} GiB at failure" if "process_peak_rss_mib" in row else "-"
            seconds = f"failed after {row['failed_after_s']:.0f} s" if "failed_after_s" in row else "-"
        check = _cell(row, "rel_diff", ".1e") + ("" if row.get("agrees", True) else " (disagrees!)")
        check = f"not checked: {row['check_failed']}" if "check_failed" in row else check
        params = f"{row['parameters'] / 1e6:.2f} M" if "parameters" in row else "-"
        lines.append(f"| {row['backbone']} | {params} | {row['mode']} | {memory} | {peak} | {seconds} | "
                     f"{check if row['mode'] == 'checkpointed' else ''} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true", help="16x16 images, 1 task (a smoke test)")
    parser.add_argument("--meta-batch", type=int, help="tasks per meta-step (default 4; --quick: 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per subprocess (default: torch's)")
    parser.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                        help="address-space growth allowed to each subprocess (default %(default)s; "
                             "at most the memory available when it starts, less 1 GiB)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows and the machine's description here")
    parser.add_argument("--single", nargs=2, metavar=("BACKBONE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = QUICK_CASE if args.quick else CASE
    case = replace(case, meta_batch=args.meta_batch) if args.meta_batch else case
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(measure(*args.single, case, args.budget_gib)))
        return
    rows = []
    for name in args.backbones:
        for mode in args.modes:
            rows.append(run_subprocess(name, mode, args))
            print(f"{name:12s} {mode:12s} {rows[-1]['status']}", file=sys.stderr, flush=True)
    machine = {"cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(), "total_memory_gib": meminfo_gib("MemTotal"),
               "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    title = (f"Second-order MAML, one meta-step on the CPU: {case.n_way}-way {case.shots}-shot {case.queries}-query, "
             f"{case.size}x{case.size}x{case.channels}, meta-batch {case.meta_batch}, {case.inner_steps} inner steps at "
             f"lr {case.inner_lr}, task_parallel=loop, float32, transductive batch norm")  # fmt: skip
    print(f"{title}\n\n{markdown_table(rows, machine['total_memory_gib'])}\n")
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['total_memory_gib']:.1f} GiB "
          f"({machine['total_memory_gib'] * 2**30 / 1e9:.1f} GB) total memory; "
          f"{machine['threads']} torch thread(s) per run, torch {machine['torch']}. Peak RSS growth: during the step, "
          f"sampled every 1 ms; process peak RSS: ru_maxrss, imports included.")  # fmt: skip
    if args.json:
        report = {"case": asdict(case), "quick": args.quick, "budget_gib": args.budget_gib, "machine": machine, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
