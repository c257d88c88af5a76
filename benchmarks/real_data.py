"""Few-shot accuracy on real images of a modality never seen in meta-training: leave-one-domain-out protocols.

Usage:
    python benchmarks/real_data.py --out runs/real_data                       # R1 and R2, 4-way 5- and 1-shot
    python benchmarks/real_data.py --protocols R1 --shots 5 --algorithms finetune maml --out runs/r1
    python benchmarks/real_data.py --quick --out /tmp/real_quick                # a few steps and episodes

Data: ``../shared/data/mednist-mini`` and ``../shared/data/realdev`` (``--data``), read only. Each
protocol is written as one CSV manifest with a ``split`` column into ``--out`` (class-disjoint:
every class of a domain belongs to that domain's split; class names are ``<domain>-<label>``):

* **R1**: meta-test ISIC dermoscopy; meta-val BUSI ultrasound + chest X-ray; meta-train MedNIST + PBC blood cells.
* **R2**: meta-test PBC blood cells; meta-val BUSI + chest X-ray; meta-train MedNIST + ISIC.

Images are 64x64 with 3 channels (colour sets as RGB, grey sets repeated; ``--in-channels 1`` makes
colour grey instead), each rescaled to [0, 1] (the ``photo`` intensity preset). Every learner trains for the same number of meta-steps on the same episodes,
is selected on meta-val accuracy only (the best validation checkpoint), and is tested on the same
frozen test episodes. Writes ``real_data.json``, ``real_data.md`` (mean ± 95% CI, wall time, peak
memory) and ``real_data.png`` (bars with CI whiskers).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import module_settings  # noqa: E402 - the same learner settings as the synthetic comparison

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DOMAINS = {  # domain -> (folder under --data, the manifest's patient column, if any)
    "mednist": ("mednist-mini", None),
    "isic": ("realdev/ISIC_Dermoscopy8", "patient_id"),
    "pbc": ("realdev/PBC_BloodCells", "patient_id"),
    "busi": ("realdev/BUSI_BreastUS", "patient_id"),
    "cxr": ("realdev/CXR_COVID_Ozturk", "patient_id"),
}
PROTOCOLS = {  # protocol -> split -> domains
    "R1": {"train": ("mednist", "pbc"), "val": ("busi", "cxr"), "test": ("isic",)},
    "R2": {"train": ("mednist", "isic"), "val": ("busi", "cxr"), "test": ("pbc",)},
}
METHODS = ("finetune", "maml", "maml_pp", "anil", "meta_sgd", "protonet")
N_WAY, Q_QUERY, IMAGE_SIZE = 4, 15, 64


def build_protocol(protocol: str, data: Path, out: Path) -> Path:
    """Write ``<out>/<protocol>.csv``: every image of the protocol's domains, labelled ``<domain>-<class>``, with its split."""
    rows = []
    for split, domains in PROTOCOLS[protocol].items():
        for domain in domains:
            folder, patient_column = DOMAINS[domain]
            root = (data / folder).resolve()
            with (root / "manifest.csv").open(newline="") as handle:
                for row in csv.DictReader(handle):
                    patient = f"{domain}-{row[patient_column]}" if patient_column and row.get(patient_column) else ""
                    rows.append({"path": str(root / row["path"]), "label": f"{domain}-{row['label']}",
                                 "patient_id": patient, "split": split})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{protocol}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_one(manifest: Path, method: str, shots: int, args: argparse.Namespace) -> dict[str, object]:
    """Meta-train ``method`` on the manifest's train split, select on val, test on the frozen test episodes."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medmeta import EpisodicDataModule, FewShotModule

    logging.disable(logging.WARNING)
    L.seed_everything(0)
    data = EpisodicDataModule(
        str(manifest), n_way=N_WAY, k_shot=shots, q_query=Q_QUERY, meta_batch_size=4, image_size=IMAGE_SIZE,
        in_channels=args.in_channels, window=None, preset="photo", train_batches_per_epoch=args.steps, val_episodes=args.val_episodes,
        test_episodes=args.test_episodes, eval_batch_size=10,
    )  # fmt: skip
    options = {"n_way": N_WAY, "image_size": IMAGE_SIZE, "in_channels": args.in_channels, "pixel_baseline": False}
    model = FewShotModule(**module_settings(method, options))
    best = ModelCheckpoint(monitor="val/acc", mode="max", dirpath=args.out / "checkpoints" / f"{manifest.stem}-{method}-{shots}")
    trainer = L.Trainer(
        max_steps=args.steps, val_check_interval=max(1, args.steps // 4), check_val_every_n_epoch=None,
        num_sanity_val_steps=0, inference_mode=False, logger=False, callbacks=[best], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out / f"{manifest.stem}-{method}-{shots}shot",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    trainer.test(model, data, ckpt_path="best", verbose=False)
    summary = model.test_summary
    return {
        "protocol": manifest.stem, "method": method, "shots": shots, "steps": args.steps,
        "test_episodes": summary["test_episodes"], "accuracy": summary["accuracy"], "ci95": summary["accuracy_ci95"],
        "best_val_acc": float(best.best_model_score) if best.best_model_score is not None else None,
        "wall_s": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "in_channels": args.in_channels, "normalisation": summary["normalisation"],
    }  # fmt: skip


def write_outputs(results: list[dict[str, object]], out: Path) -> None:
    """``real_data.json``, ``real_data.md`` and ``real_data.png`` (accuracy bars with 95% CI whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "real_data.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| protocol | method | shots | accuracy ± 95% CI | wall time | peak memory |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['protocol']} | {r['method']} | {r['shots']} | {100 * r['accuracy']:.1f}% ± {100 * r['ci95']:.1f}% | "
             f"{r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |" for r in results]  # fmt: skip
    (out / "real_data.md").write_text("\n".join(rows) + "\n")
    groups = sorted({(r["protocol"], r["shots"]) for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows_of = {(r["protocol"], r["shots"]): r for r in results if r["method"] == method}
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [100 * rows_of[k]["accuracy"] if k in rows_of else 0 for k in groups], width,
               yerr=[100 * rows_of[k]["ci95"] if k in rows_of else 0 for k in groups], capsize=3, label=method)  # fmt: skip
    ax.axhline(100 / N_WAY, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))], [f"{p} {k}-shot" for p, k in groups])
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "real_data.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding mednist-mini/ and realdev/ (read only)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--algorithms", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--in-channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--quick", action="store_true", help="4 steps, 4 val and 8 test episodes (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/real_data"))
    parser.add_argument("--single", nargs=3, metavar=("PROTOCOL", "METHOD", "SHOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.val_episodes, args.test_episodes = 4, 4, 8
    missing = [DOMAINS[d][0] for d in DOMAINS if not (args.data / DOMAINS[d][0] / "manifest.csv").is_file()]
    if missing:
        parser.error(f"the data sets {', '.join(missing)} are not under {args.data} (--data)")
    args.out = args.out.resolve()
    if args.single:
        protocol, method, shots = args.single
        print(json.dumps(run_one(args.out / f"{protocol}.csv", method, int(shots), args)))
        return
    results = []
    for protocol in args.protocols:
        build_protocol(protocol, args.data, args.out)
        for shots in args.shots:
            for method in args.algorithms:
                command = [sys.executable, __file__, "--single", protocol, method, str(shots), "--data", str(args.data),
                           "--steps", str(args.steps), "--val-episodes", str(args.val_episodes), "--test-episodes",
                           str(args.test_episodes), "--in-channels", str(args.in_channels), "--out", str(args.out)]  # fmt: skip
                line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                results.append(json.loads(line))
                r = results[-1]
                print(f"{protocol} {method:9s} {shots}-shot  {100 * r['accuracy']:5.1f}% ± {100 * r['ci95']:.1f}  "
                      f"{r['wall_s']:6.1f} s  peak {r['peak_rss_mb']:6.0f} MB", flush=True)  # fmt: skip
    write_outputs(results, args.out)
    print(f"wrote {args.out / 'real_data.md'} and {args.out / 'real_data.png'}")


if __name__ == "__main__":
    main()
