"""Compare every algorithm on the same frozen episodes of the synthetic 2D lesion set.

Usage:
    python benchmarks/compare.py --steps 300 --shots 1 5 --out runs/compare
    python benchmarks/compare.py --algorithms mann --shots 1 --set mann_controller=lstm --out runs/mann-lstm

Each (algorithm, shots) pair trains in its own subprocess (so peak memory is its own) for the
same number of meta-steps on the same data, then is tested on the same frozen test episodes
(episode = f(seed, split, index)). Writes ``compare.json``, ``compare.md`` (a table) and
``compare.png`` (accuracy with 95% CI error bars) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

ALGORITHMS = ("maml", "maml_pp", "meta_sgd", "anil", "protonet", "mann", "finetune")


def run_one(
    algorithm: str, shots: int, steps: int, test_episodes: int, out: Path, options: dict[str, object] | None = None
) -> dict[str, object]:
    """Train and test one algorithm in this process; return its figures. ``options`` override ``FewShotModule`` settings."""
    import lightning as L

    from medmeta import EpisodicDataModule, FewShotModule

    logging.disable(logging.WARNING)
    L.seed_everything(0)
    data = EpisodicDataModule(
        None, n_way=5, k_shot=shots, q_query=15, meta_batch_size=4, image_size=32,
        train_batches_per_epoch=steps, test_episodes=test_episodes, eval_batch_size=20,
    )  # fmt: skip
    settings = {
        "algorithm": algorithm, "n_way": 5, "image_size": 32, "hidden_channels": 32, "inner_lr": 0.05, "inner_steps": 5,
        "eval_inner_steps": 10, "meta_lr": 0.001 if algorithm == "mann" else 0.003,
    }  # fmt: skip
    model = FewShotModule(**{**settings, **(options or {})})
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out / f"{algorithm}-{shots}shot",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    trainer.test(model, data, verbose=False)
    summary = model.test_summary
    return {
        "algorithm": algorithm, "shots": shots, "steps": steps, "test_episodes": summary["test_episodes"],
        "accuracy": summary["accuracy"], "ci95": summary["accuracy_ci95"], "train_s": train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "normalisation": summary["normalisation"], "options": options or {},
    }  # fmt: skip


def plot(results: list[dict[str, object]], path: Path) -> None:
    """Bar plot of accuracy with 95% CI error bars, one group per shot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shots"] for r in results})
    names = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in results)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(shots)
    for i, k in enumerate(shots):
        rows = {r["algorithm"]: r for r in results if r["shots"] == k}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * rows[n]["accuracy"] for n in names], width,
               yerr=[100 * rows[n]["ci95"] for n in names], capsize=3, label=f"5-way {k}-shot")  # fmt: skip
    ax.axhline(20, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([j + width * (len(shots) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="FewShotModule settings for every run, e.g. mann_controller=lstm (values parsed as YAML)")
    parser.add_argument("--single", nargs=2, metavar=("ALGORITHM", "SHOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    options = _parse_settings(parser, args.set)
    if args.single:
        result = run_one(args.single[0], int(args.single[1]), args.steps, args.test_episodes, args.out, options)
        print(json.dumps(result))
        return
    results = []
    for shots in args.shots:
        for algorithm in args.algorithms:
            command = [sys.executable, __file__, "--single", algorithm, str(shots), "--steps", str(args.steps),
                       "--test-episodes", str(args.test_episodes), "--out", str(args.out)]  # fmt: skip
            command += ["--set", *args.set] if args.set else []
            line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            r = results[-1]
            print(f"{algorithm:9s} {shots}-shot  {100 * r['accuracy']:5.1f}% ± {100 * r['ci95']:.1f}  "
                  f"train {r['train_s']:6.1f} s  peak {r['peak_rss_mb']:6.0f} MB", flush=True)  # fmt: skip
    (args.out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| algorithm | shots | accuracy ± 95% CI | train time | peak memory |", "|---|---|---|---|---|"]
    rows += [f"| {r['algorithm']} | {r['shots']} | {100 * r['accuracy']:.1f}% ± {100 * r['ci95']:.1f}% | "
             f"{r['train_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |" for r in results]  # fmt: skip
    (args.out / "compare.md").write_text("\n".join(rows) + "\n")
    plot(results, args.out / "compare.png")
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")


def _parse_settings(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as a dict, each value parsed as YAML (numbers, booleans, lists, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


if __name__ == "__main__":
    main()
