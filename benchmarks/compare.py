"""Compare every algorithm on the same frozen episodes of the synthetic 2D lesion set.

Usage:
    python benchmarks/compare.py --steps 300 --shots 1 5 --out runs/compare
    python benchmarks/compare.py --algorithms mann --shots 1 --set controller=lstm --out runs/mann-lstm

Each (algorithm, shots) pair trains in its own subprocess (so peak memory is its own) for the
same number of meta-steps on the same data, then is tested on the same frozen test episodes
(episode = f(seed, split, index)). The learners are the registry's
(``medmeta.algorithms.SHORT_NAMES``); each gets the common inner-loop settings below where it has
them, on a Conv-4 of width 32. ``--set KEY=VALUE`` changes a learner setting (for every compared
learner that has it, e.g. ``distance=cosine``), a backbone setting (``norm=group``) or a module
setting (``meta_lr=0.01``). Writes ``compare.json``, ``compare.md`` (a table) and ``compare.png``
(accuracy with 95% CI error bars) to ``--out``.
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

from medmeta.algorithms import SHORT_NAMES

ALGORITHMS = tuple(SHORT_NAMES)
COMMON_LEARNER_SETTINGS = {"inner_lr": 0.05, "inner_steps": 5, "eval_inner_steps": 10}  # to learners that have them
BACKBONE = {"class_path": "conv4", "init_args": {"hidden_channels": 32}}


def module_settings(algorithm: str, options: dict[str, object] | None = None) -> dict[str, object]:
    """``FewShotModule`` arguments for one compared learner: its spec, the backbone's, the module's own settings.

    Each ``options`` key goes where it is a setting: the learner's ``init_args`` (when this learner
    has it), the backbone's, or the module's; a key of another learner only is left out here.
    """
    from medmeta.module import FewShotModule
    from medmeta.networks import backbone_settings, resolve_backbone

    learner = SHORT_NAMES[algorithm].settings()
    backbone = backbone_settings(resolve_backbone(BACKBONE["class_path"])[0])
    init_args = {k: v for k, v in COMMON_LEARNER_SETTINGS.items() if k in learner}
    backbone_args = dict(BACKBONE["init_args"])
    settings: dict[str, object] = {"n_way": 5, "image_size": 32, "meta_lr": 0.001 if algorithm == "mann" else 0.003}
    for key, value in (options or {}).items():
        if key in learner:
            init_args[key] = value
        elif key in backbone:
            backbone_args[key] = value
        elif key in _module_parameters(FewShotModule):
            settings[key] = value
    return {
        "algorithm": {"class_path": algorithm, "init_args": init_args},
        "backbone": {"class_path": BACKBONE["class_path"], "init_args": backbone_args}, **settings,
    }  # fmt: skip


def unknown_settings(options: dict[str, object], algorithms: list[str]) -> list[str]:
    """The ``options`` keys that no compared learner, the backbone nor the module takes (with today's name if renamed)."""
    from medmeta.algorithms import legacy_setting_name
    from medmeta.module import FewShotModule
    from medmeta.networks import backbone_settings, resolve_backbone

    known = {*backbone_settings(resolve_backbone(BACKBONE["class_path"])[0]), *_module_parameters(FewShotModule)}
    known |= {name for algorithm in algorithms for name in SHORT_NAMES[algorithm].settings()}
    problems = []
    for key in options:
        if key not in known:
            renamed = legacy_setting_name(key)
            hint = f" (now {renamed!r})" if renamed not in (None, key) else ""
            problems.append(f"{key}{hint}")
    return problems


def _module_parameters(cls: type) -> list[str]:
    import inspect

    return [name for name in inspect.signature(cls).parameters if name not in ("algorithm", "backbone")]


def run_one(
    algorithm: str, shots: int, steps: int, test_episodes: int, out: Path, options: dict[str, object] | None = None
) -> dict[str, object]:
    """Train and test one learner in this process; return its figures. ``options``: see :func:`module_settings`."""
    import lightning as L

    from medmeta import EpisodicDataModule, FewShotModule

    logging.disable(logging.WARNING)
    L.seed_everything(0)
    data = EpisodicDataModule(
        None, n_way=5, k_shot=shots, q_query=15, meta_batch_size=4, image_size=32,
        train_batches_per_epoch=steps, test_episodes=test_episodes, eval_batch_size=20,
    )  # fmt: skip
    model = FewShotModule(**module_settings(algorithm, options))
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # ru_maxrss is KiB: this is MiB
        "normalisation": summary["normalisation"], "options": options or {},
        "settings": model.hparams["algorithm"]["init_args"],
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
                        help="learner, backbone or module settings, e.g. controller=lstm (values parsed as YAML); a learner "
                             "setting applies to every compared learner that has it")
    parser.add_argument("--single", nargs=2, metavar=("ALGORITHM", "SHOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = _parse_settings(parser, args.set)
    unknown = unknown_settings(options, args.algorithms)
    if unknown:
        parser.error(f"--set: no compared learner, the backbone or the module has the setting(s) {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
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
                  f"train {r['train_s']:6.1f} s  peak {r['peak_rss_mb']:6.0f} MiB", flush=True)  # fmt: skip
    (args.out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| algorithm | shots | accuracy ± 95% CI | train time | peak memory |", "|---|---|---|---|---|"]
    rows += [f"| {r['algorithm']} | {r['shots']} | {100 * r['accuracy']:.1f}% ± {100 * r['ci95']:.1f}% | "
             f"{r['train_s']:.0f} s | {r['peak_rss_mb']:.0f} MiB |" for r in results]  # fmt: skip
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
