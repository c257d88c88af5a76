"""What the test's adaptation curve costs: one test batch adapted with and without it, side by side.

Usage:
    python benchmarks/curve_cost.py runs/real_data_maml/checkpoints/best.ckpt --steps 40 --query-flips

Loads a trained MAML-family checkpoint and times one batch of random episodes of its shape (the time
does not depend on the pixels) three ways, interleaved ``--repeats`` times: the adaptation alone
(``adapt_and_predict``), with the curve the test records (queries predicted after ``curve_steps``:
at most 11 steps) and with a curve after every step (what the test recorded before ``curve_steps``).
All three must give bitwise the same final logits. Prints each one's best time and its ratio to the
adaptation alone; ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_curves(ckpt: Path, steps: int, query_flips: bool, tasks: int, repeats: int) -> dict[str, float]:
    """Best seconds per batch of ``tasks`` episodes for ``none``, ``curve_steps`` and ``every_step``."""
    from medmeta.algorithms.base import curve_steps
    from medmeta.checkpoints import load_trained

    module, settings = load_trained(ckpt)
    learner = module.algorithm
    if learner.adaptation_steps() is None:
        raise SystemExit(f"{learner.label()} has no inner steps to count (a MAML-family learner has)")
    learner.eval_inner_steps, learner.query_augment = steps, query_flips or learner.query_augment
    module.eval()
    n_way, k_shot, q_query = module.hparams.n_way, settings.get("k_shot", 5), settings.get("q_query", 15)
    shape = (module.hparams.in_channels, *[module.hparams.image_size] * module.hparams.spatial_dims)
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, n_way * k_shot, *shape, generator=g)
    sy = torch.arange(n_way).repeat_interleave(k_shot).expand(tasks, -1).contiguous()
    qx = torch.rand(tasks, n_way * q_query, *shape, generator=g)
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "none": lambda: learner.adapt_and_predict(sx, sy, qx),
        "curve_steps": lambda: learner.adapt_and_predict_every_step(sx, sy, qx, at_steps=curve_steps(steps))[-1],
        "every_step": lambda: learner.adapt_and_predict_every_step(sx, sy, qx)[-1],
    }
    best = dict.fromkeys(ways, float("inf"))
    logits = {}
    for _ in range(repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            logits[name] = way()
            best[name] = min(best[name], time.perf_counter() - start)
    if not all(torch.equal(logits["none"], other) for other in logits.values()):
        raise SystemExit("the three ways gave different final logits: the curve must not change the prediction")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a MAML-family checkpoint written by medmeta fit")
    parser.add_argument("--steps", type=int, default=40, help="inner steps at test")
    parser.add_argument("--query-flips", action="store_true", help="predict each query from its flips (query_augment)")
    parser.add_argument("--tasks", type=int, default=8, help="episodes per batch (the test's eval_batch_size)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time of each counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the times as JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.tasks < 1 or args.repeats < 1:
        parser.error("--steps, --tasks and --repeats must be at least 1")
    logging.disable(logging.WARNING)
    best = time_curves(args.checkpoint, args.steps, args.query_flips, args.tasks, args.repeats)
    for name, seconds in best.items():
        print(f"{name:12s} {seconds:8.2f} s per batch of {args.tasks}  ratio to none {seconds / best['none']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "tasks": args.tasks, "seconds": best}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
