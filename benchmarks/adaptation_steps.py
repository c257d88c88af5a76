"""How many adaptation steps at test time? Meta-val accuracy after each inner step of a trained MAML-family checkpoint.

Usage:
    python benchmarks/adaptation_steps.py runs/real_data_maml/checkpoints/best.ckpt --max-steps 40
    python benchmarks/adaptation_steps.py CKPT --max-steps 40 --every 5 --tolerance 0.5 --out steps.json

Draws the checkpoint's own meta-val episodes (its saved data settings: the same classes, shots and
seed as validation during ``fit``; never the test split), adapts on each support set for 0..``--max-steps``
inner steps and prints the query accuracy after each, with its 95% CI. The suggested
``eval_inner_steps`` is the fewest steps whose accuracy is within ``--tolerance`` points of the best
(a longer plateau is not worth its compute). ``configs/real_data_maml.yaml``'s 20 steps came from
this rule on R1 and R2 (BENCHMARKS.md). With ``--data-root`` another folder or manifest is read
instead of the one the model was trained on (its meta-val split).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch


def accuracy_after_each_step(ckpt: Path, steps: list[int], episodes: int | None, data_root: str | None) -> torch.Tensor:
    """``[episodes, len(steps)]``: each meta-val episode's query accuracy after each of ``steps`` inner steps (ascending).

    One inner loop of ``steps[-1]`` steps per episode; the queries are predicted after ``steps`` only.
    """
    from medmeta import EpisodicDataModule
    from medmeta.checkpoints import load_trained

    module, settings = load_trained(ckpt)
    if settings.get("root") is None and data_root is None:
        raise SystemExit(f"{ckpt} records no data folder: give --data-root")
    settings = {**settings, **({"root": data_root} if data_root else {}), **({"val_episodes": episodes} if episodes else {})}
    data = EpisodicDataModule(**settings)
    data.setup("validate")
    rows = []
    with torch.no_grad():
        for batch in data.val_dataloader():
            curve = module.algorithm.adapt_and_predict_every_step(batch["support_x"], batch["support_y"], batch["query_x"],
                                                                  steps=steps[-1], at_steps=steps)  # fmt: skip
            if curve is None:
                raise SystemExit(f"{module.algorithm.label()} has no inner steps to count (a MAML-family learner has)")
            rows.append((curve.argmax(-1) == batch["query_y"]).float().mean(-1).T)
    return torch.cat(rows)


def suggested_steps(mean: torch.Tensor, tolerance: float, candidates: list[int]) -> int:
    """The fewest of ``candidates`` steps whose mean accuracy (points; ``mean[i]`` after ``candidates[i]`` steps)
    is within ``tolerance`` of the best candidate's."""
    best = float(mean.max())
    return min(k for k, value in zip(candidates, mean.tolist(), strict=True) if value >= best - tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a MAML-family checkpoint written by medmeta fit")
    parser.add_argument("--max-steps", type=int, default=40, help="count up to this many inner steps")
    parser.add_argument("--every", type=int, default=5, help="candidate step counts: 0, every, 2*every, ... max-steps")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points below the best that still count as the best")
    parser.add_argument("--episodes", type=int, default=None, help="meta-val episodes (default: the checkpoint's val_episodes)")
    parser.add_argument("--data-root", default=None, help="read this folder or manifest instead of the training one")
    parser.add_argument("--out", type=Path, default=None, help="also write the curve as JSON here")
    args = parser.parse_args()
    if args.max_steps < 1 or args.every < 1:
        parser.error("--max-steps and --every must be at least 1")
    logging.disable(logging.WARNING)
    candidates = sorted({*range(0, args.max_steps + 1, args.every), args.max_steps})
    accuracy = 100 * accuracy_after_each_step(args.checkpoint, candidates, args.episodes, args.data_root)
    mean = accuracy.mean(0)
    ci95 = 1.96 * accuracy.std(0) / math.sqrt(len(accuracy)) if len(accuracy) > 1 else torch.zeros_like(mean)
    for k, value, half_width in zip(candidates, mean.tolist(), ci95.tolist(), strict=True):
        print(f"{k:4d} steps  {value:5.1f}% ± {half_width:.1f}")
    steps = suggested_steps(mean, args.tolerance, candidates)
    print(f"suggested eval_inner_steps: {steps} (the fewest within {args.tolerance:g} points of the best, "
          f"{len(accuracy)} meta-val episodes)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"episodes": len(accuracy), "after_steps": candidates, "accuracy_after_step": mean.tolist(),
                                        "ci95": ci95.tolist(), "suggested_steps": steps}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
