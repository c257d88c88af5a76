"""Few-shot accuracy on real images of a modality never seen in meta-training: leave-one-domain-out protocols.

Usage:
    python benchmarks/real_data.py --out runs/real_data                       # R1 and R2, 4-way 5- and 1-shot
    python benchmarks/real_data.py --protocols R1 --shots 5 --algorithms finetune maml --out runs/r1
    python benchmarks/real_data.py --algorithms finetune meta_baseline --jobs 2 --out runs/mb   # R1 and R2 side by side
    python benchmarks/real_data.py --quick --out /tmp/real_quick                # a few steps and episodes
    python benchmarks/real_data.py --algorithms finetune finetune_levels_flips --seed 1 --out runs/real_data  # another seed
    python benchmarks/real_data.py --summarise runs/seed0 runs/seed1                  # seeds.md over several --out

Data: ``../shared/data/mednist-mini`` and ``../shared/data/realdev`` (``--data``), read only. Each
protocol is written as one CSV manifest with a ``split`` column into ``--out`` (class-disjoint:
every class of a domain belongs to that domain's split; class names are ``<domain>-<label>``):

* **R1**: meta-test ISIC dermoscopy; meta-val BUSI ultrasound + chest X-ray; meta-train MedNIST + PBC blood cells.
* **R2**: meta-test PBC blood cells; meta-val BUSI + chest X-ray; meta-train MedNIST + ISIC.
* **R1o** and **R2o** (``--protocols R1o R2o``): the same test domains, each validated on the other
  orientation-free domain (PBC for R1o, ISIC for R2o), meta-train MedNIST + BUSI + chest X-ray. The
  test domain is still never seen before the test, and meta-val can judge priors about orientation
  (query flips), which oriented ultrasound and radiographs reject.

Images are 64x64 with 3 channels (colour sets as RGB, grey sets repeated; ``--in-channels 1`` makes
colour grey instead), each rescaled to [0, 1] (the ``photo`` intensity preset). Every learner trains for the same number of meta-steps on the same episodes,
is selected on meta-val accuracy only (the best validation checkpoint), and is tested on the same
frozen test episodes. Each finished run is kept in ``--out``/results, and a re-run with the same
``--out`` skips it (so an interrupted benchmark resumes; delete the folder to start over). Ctrl-C
stops the runs in progress (an unfinished run keeps nothing) and exits with status 130. An ``--out``
holding a run made with other ``--steps``, episodes, ``--in-channels``, ``--backbone`` or ``--set`` is
refused before anything runs: its rows would be reused or summarised as this invocation's.
Writes this invocation's rows as ``real_data.json``, ``real_data.md`` (mean ± 95% CI, wall time, peak
memory) and ``real_data.png`` (bars with CI whiskers). ``environment.json`` records the Python, the
platform, the CPU and every installed package's version; a later invocation with the same ``--out``
in another environment is refused (its rows would not be comparable: the same code has given
figures 4 points apart after the packages were resolved again), unless ``--allow-new-environment``.
``--seed`` (default 0) seeds torch's generator (the weights' initialisation and whatever else a
learner draws from it); the class splits and every episode, training episodes and their
augmentation included, stay those of seed 0, so every seed is tested on the same frozen test
episodes. Runs of another seed are kept beside seed 0's in the same ``--out`` (``...-seed1``), and
a ``reuse`` or ``two_stage`` method adapts the weights of its own seed. ``seeds.md`` summarises every
row in ``--out``, of every seed: each method's accuracy per seed, its mean and sd, and its gain over
``finetune`` of the same seed (the training seed moves a method by more than its CI over episodes);
and, for each learner (e.g. every second-order MAML setting), the row meta-val selects on each seed,
with its test gain over ``finetune``: the rule any claim about a learner's best setting goes by.
Seeds run side by side in separate ``--out`` folders (one core each) are summarised together by
``--summarise OUT [OUT ...]``, which runs nothing and prints the same tables; it refuses folders with
other environments, settings or protocol manifests, and a run whose figures differ between folders.

Methods (``METHODS``) are a learner with settings and how it starts:

* from scratch, trained for ``--steps`` meta-steps (``finetune``, ``protonet``, ``protonet_cosine``
  (cosine, learned temperature), ``maml``, ``maml_pp``, ``anil``, ``meta_sgd``;
  ``finetune_levels_pretrained_flips``: the fine-tune learner on a backbone giving every stage's
  features, so its pre-training head sees them too, adapted as ``finetune_levels_flips``);
* ``reuse``: another run's selected weights (the ``finetune`` pre-training unless said otherwise),
  adapted differently at test time, with no training of its own: ``logreg``, ``logreg_augment``,
  ``finetune_adam`` (the baseline's head fitted with Adam, as before gradient descent became the
  default), ``finetune_last_block``, ``finetune_augment`` (support flips), ``finetune_flips`` (support
  flips and flip-averaged queries), ``finetune_levels`` (a head on every stage's features),
  ``finetune_levels_flips`` (both: ``configs/real_data.yaml``), ``logreg_levels_flips``,
  ``finetune_transductive``, ``meta_baseline_augment`` (the ``meta_baseline`` run's weights), and, on
  the ``maml_init`` run's weights, ``maml_init_steps20``, ``maml_init_steps20_qflips`` (flip-averaged
  queries), ``maml_init_steps40_qflips`` (the same with 40 inner steps) and ``maml_init_steps20_flips``
  (support flips as well), on the ``maml_init_final`` run's weights ``maml_init_final_steps20_qflips``,
  on the ``proto_maml_init`` run's weights ``proto_maml_init_steps20``, on the ``meta_sgd_init`` run's
  weights and rates ``meta_sgd_init_qflips`` (flip-averaged queries); and ``maml_init``'s meta-trained
  backbone adapted as the fine-tune family does, ``maml_init_finetune`` (as ``finetune``) and
  ``maml_init_levels_flips`` (as ``finetune_levels_flips``);
* ``two_stage``: the same total budget split in two, a fine-tune pre-training of ``steps // 2`` steps
  (selected on meta-val; its last weights are kept too), then ``steps - steps // 2`` meta-steps of the
  learner started from it with ``--model.init_from`` (``meta_baseline``, ``maml_init``,
  ``maml_zero_init``: MAML with the head zeroed at the start of every task and 20 test steps,
  ``maml_init_final``: MAML from the pre-training's last weights instead of its selected ones,
  ``maml_levels_init`` and ``maml_levels_init_lr05``: MAML on a backbone giving every stage's features,
  20 test steps, inner step 0.05 or 0.5, ``proto_maml_init``: Proto-MAML, ``anil_init``,
  ``maml_pp_init``, ``meta_sgd_init``: Meta-SGD's rate per weight from 0.05, and
  ``meta_sgd_levels_init``: the same on every stage's features, from 0.5; both 20 test steps;
  ``meta_sgd_levels_init_rates``: the rates meta-learned ten times faster than the weights).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    # the same test domains, validated on a domain with no up or down like them (the other one), the oriented
    # ultrasound and radiographs moved into meta-train: meta-val can then judge orientation priors such as query flips
    "R1o": {"train": ("mednist", "busi", "cxr"), "val": ("pbc",), "test": ("isic",)},
    "R2o": {"train": ("mednist", "busi", "cxr"), "val": ("isic",), "test": ("pbc",)},
}
MAIN_PROTOCOLS = ("R1", "R2")  # the protocols, run by default


@dataclass(frozen=True)
class Method:
    """A compared method: a learner (registry short name), its settings, its backbone's, and how it starts."""

    learner: str
    settings: dict[str, object] = field(default_factory=dict)
    backbone: dict[str, object] = field(default_factory=dict)  # the backbone's init_args beyond the compared ones
    start: str = "scratch"  # "scratch", "reuse" (another method's selected weights, test only) or "two_stage"
    source: str = "finetune"  # the method whose weights "reuse" tests
    pretrain: str = "selected"  # "two_stage" starts from the pre-training's meta-val-selected weights, or its "final" ones

    def __post_init__(self) -> None:
        if self.start not in ("scratch", "reuse", "two_stage") or self.pretrain not in ("selected", "final"):
            raise ValueError(f"unknown start {self.start!r} or pretrain {self.pretrain!r}")


META_BASELINE = {"distance": "cosine", "temperature": 0.1, "learn_temperature": True}
FLIPS = {"support_augment": True, "query_augment": True}  # the support set's flips, and flip-averaged query predictions
ADAM = {"finetune_optimizer": "adam"}  # the head fitted with Adam: the baseline before gradient descent was selected on meta-val
LEVELS = {"feature_levels": "all"}  # a backbone giving every stage's features (medmeta.networks.levels)
FROM_PRETRAINED = {"meta_lr": 0.001}  # a smaller outer step, not to wash out the pre-trained features
METHODS: dict[str, Method] = {
    "finetune": Method("finetune"),
    "logreg": Method("logreg", start="reuse"),
    "finetune_adam": Method("finetune", ADAM, start="reuse"),
    "finetune_last_block": Method("finetune", {"finetune_scope": "last_block", **ADAM}, start="reuse"),
    "finetune_augment": Method("finetune", {"support_augment": True, **ADAM}, start="reuse"),
    "finetune_transductive": Method("finetune", {"query_entropy_weight": 1.0, **ADAM}, start="reuse"),
    "logreg_augment": Method("logreg", {"support_augment": True}, start="reuse"),
    "finetune_flips": Method("finetune", {**FLIPS, **ADAM}, start="reuse"),
    "finetune_levels": Method("finetune", {"feature_levels": "all", **ADAM}, start="reuse"),
    "finetune_levels_flips": Method("finetune", {"feature_levels": "all", **FLIPS, **ADAM}, start="reuse"),
    "logreg_levels_flips": Method("logreg", {"feature_levels": "all", **FLIPS}, start="reuse"),
    "protonet": Method("protonet"),
    "protonet_cosine": Method("protonet", META_BASELINE),
    "maml": Method("maml"),
    "maml_pp": Method("maml_pp"),
    "anil": Method("anil"),
    "meta_sgd": Method("meta_sgd"),
    "meta_baseline": Method("protonet", {**META_BASELINE, **FROM_PRETRAINED}, start="two_stage"),
    "meta_baseline_augment": Method("protonet", {**META_BASELINE, **FROM_PRETRAINED, "support_augment": True}, start="reuse",
                                    source="meta_baseline"),  # fmt: skip
    "maml_init": Method("maml", FROM_PRETRAINED, start="two_stage"),
    # maml_init's weights adapted with 20 inner steps instead of 10: the fewest steps within 0.5 points of the best
    # meta-val accuracy on both protocols (meta-val, 50 episodes, steps 5..40: BENCHMARKS.md); the test domain was not used
    "maml_init_steps20": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20}, start="reuse", source="maml_init"),
    "maml_init_steps20_flips": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20, **FLIPS}, start="reuse",
                                      source="maml_init"),
    # flip-averaged queries only: the support set (and so the cost of the 20 inner steps) stays as it is
    "maml_init_steps20_qflips": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20, "query_augment": True},
                                       start="reuse", source="maml_init"),
    # the same with 40 inner steps: blood cells gained 9 points from 10 to 20 steps, still rising where meta-val was flat
    "maml_init_steps40_qflips": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 40, "query_augment": True},
                                       start="reuse", source="maml_init"),
    # as maml_init, from the pre-training's last weights instead of its meta-val-selected ones: a 50-episode meta-val picks
    # among 4 checkpoints by noise, and seed 1 of R2o kept step 37 of 150 (BENCHMARKS.md)
    "maml_init_final": Method("maml", FROM_PRETRAINED, start="two_stage", pretrain="final"),
    "maml_init_final_steps20_qflips": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20, "query_augment": True},
                                             start="reuse", source="maml_init_final"),
    # every task's inner loop starts from a zero head (the zeroing trick), in meta-training and at test
    "maml_zero_init": Method("maml", {**FROM_PRETRAINED, "zero_head": True, "eval_inner_steps": 20}, start="two_stage"),
    # the backbone gives every stage's features (feature_levels: all, as the recommended fine-tuning's head sees), so
    # MAML's inner loop adapts a head on them; 20 test steps. The features are L2-normalised per level, which makes
    # its gradients 14 to 23 times smaller than on the plain Conv-4's (BENCHMARKS.md): hence also a 10 times larger inner step
    "maml_levels_init": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20}, LEVELS, start="two_stage"),
    "maml_levels_init_lr05": Method("maml", {**FROM_PRETRAINED, "eval_inner_steps": 20, "inner_lr": 0.5}, LEVELS,
                                    start="two_stage"),
    # the pre-training's own head on every stage's features too (the backbone's), then adapted as finetune_levels_flips
    "finetune_levels_pretrained_flips": Method("finetune", {**FLIPS, **ADAM}, LEVELS),
    # the head of every task starts from the support prototypes (Proto-MAML), the rest as maml_init
    "proto_maml_init": Method("proto_maml", FROM_PRETRAINED, start="two_stage"),
    "proto_maml_init_steps20": Method("proto_maml", {**FROM_PRETRAINED, "eval_inner_steps": 20}, start="reuse",
                                      source="proto_maml_init"),
    # maml_init's meta-trained backbone, adapted as the fine-tune family adapts (a new head on frozen features): whether
    # second-order MAML's meta-training makes better features than as many more supervised steps (finetune's)
    "maml_init_finetune": Method("finetune", start="reuse", source="maml_init"),
    "maml_init_levels_flips": Method("finetune", {"feature_levels": "all", **FLIPS, **ADAM}, start="reuse",
                                     source="maml_init"),
    "anil_init": Method("anil", FROM_PRETRAINED, start="two_stage"),
    "maml_pp_init": Method("maml_pp", {"eval_inner_steps": 20, **FROM_PRETRAINED}, start="two_stage"),
    # Meta-SGD (second-order MAML with an inner rate learned per weight) from the pre-training, 20 test steps: whether
    # learned rates find what MAML's one shared rate misses (which layers to adapt, and by how much)
    "meta_sgd_init": Method("meta_sgd", {**FROM_PRETRAINED, "eval_inner_steps": 20}, start="two_stage"),
    # its weights and learned rates, each query predicted from its flips (as maml_init_steps20_qflips is maml_init's)
    "meta_sgd_init_qflips": Method("meta_sgd", {**FROM_PRETRAINED, "eval_inner_steps": 20, "query_augment": True},
                                   start="reuse", source="meta_sgd_init"),
    # the same on every stage's features, whose L2-normalised gradients are 14-23 times smaller: rates started at 0.5
    "meta_sgd_levels_init": Method("meta_sgd", {**FROM_PRETRAINED, "eval_inner_steps": 20, "inner_lr": 0.5}, LEVELS,
                                   start="two_stage"),
    # the same, the rates meta-learned at 0.01 instead of meta_lr's 0.001 (which moved them from 0.5 to 0.52-0.64 only)
    "meta_sgd_levels_init_rates": Method("meta_sgd", {**FROM_PRETRAINED, "eval_inner_steps": 20, "inner_lr": 0.5,
                                                      "rates_meta_lr": 0.01}, LEVELS, start="two_stage"),
}
RECOMMENDED = "finetune_levels_flips"  # what configs/real_data.yaml ships (tests/test_benchmark_scripts.py keeps them equal)
BEST_MAML = "maml_init_steps20"  # what configs/real_data_maml.yaml ships: the best MAML row on meta-val (the same test keeps them equal)
DEFAULT_METHODS = ("finetune", "logreg", "protonet", "maml", "maml_pp", "anil", "meta_sgd", "meta_baseline", "maml_init")
PRETRAIN = "pretrain"  # the two-stage methods' first stage: a fine-tune pre-training of steps // 2
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
    """Train ``method`` on the manifest's train split (or reuse a pre-training), select on val, test on the frozen test episodes."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medmeta import EpisodicDataModule, FewShotModule
    from medmeta.networks.initialise import initialise_backbone

    logging.disable(logging.WARNING)
    L.seed_everything(args.seed)  # the weights; every episode and its augmentation are the data module's (seed 0)
    spec = METHODS.get(method, Method("finetune"))  # PRETRAIN is the fine-tune learner
    steps = {"scratch": args.steps, "reuse": 0, "two_stage": args.steps - args.steps // 2}[spec.start]
    if method == PRETRAIN:
        steps = args.steps // 2
    data = EpisodicDataModule(
        str(manifest), n_way=N_WAY, k_shot=shots, q_query=Q_QUERY, meta_batch_size=4, image_size=IMAGE_SIZE,
        in_channels=args.in_channels, window=None, preset="photo", train_batches_per_epoch=max(steps, 1),
        val_episodes=args.val_episodes, test_episodes=args.test_episodes, eval_batch_size=10,
    )  # fmt: skip
    options = {"n_way": N_WAY, "image_size": IMAGE_SIZE, "in_channels": args.in_channels, "pixel_baseline": False,
               **args.settings, **spec.settings}  # fmt: skip
    settings = module_settings(spec.learner, options)
    if args.backbone:
        settings["backbone"]["class_path"] = args.backbone
    settings["backbone"]["init_args"].update(spec.backbone)
    source = {"reuse": spec.source, "two_stage": PRETRAIN}.get(spec.start)
    if spec.start == "two_stage" and spec.pretrain == "final":
        settings["init_from"] = str(final_checkpoint(args.out, manifest.stem, shots, args.seed))
    elif source:
        settings["init_from"] = str(best_checkpoint(args.out, manifest.stem, source, shots, args.seed))
    model = FewShotModule(**settings)
    name = run_name(manifest.stem, method, shots, args.seed)
    best = ModelCheckpoint(monitor="val/acc", mode="max", dirpath=args.out / "checkpoints" / name)
    trainer = L.Trainer(
        max_steps=max(steps, 1), val_check_interval=max(1, steps // 4), check_val_every_n_epoch=None,
        num_sanity_val_steps=0, inference_mode=False, logger=False, callbacks=[best], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out / f"{manifest.stem}-{method}-{shots}shot{seed_suffix(args.seed)}",
    )  # fmt: skip
    start = time.perf_counter()
    if steps:
        trainer.fit(model, data)
        if method == PRETRAIN:  # its last weights too, for a second stage that starts from the end of the pre-training
            trainer.save_checkpoint(final_checkpoint(args.out, manifest.stem, shots, args.seed, check=False))
        trainer.test(model, data, ckpt_path="best", verbose=False)
    else:  # another run's selected weights, adapted this method's way
        saved = torch.load(settings["init_from"], map_location="cpu", weights_only=True)["state_dict"]
        if METHODS[spec.source].learner == spec.learner:  # the whole learner (a learned temperature, say)
            model.load_state_dict(saved)
        else:  # the backbone of the fine-tune pre-training
            initialise_backbone(model.model, Path(settings["init_from"]))
        trainer.validate(model, data, verbose=False)
        best.best_model_score = trainer.callback_metrics.get("val/acc")
        trainer.test(model, data, verbose=False)
    summary = model.test_summary
    return {
        "protocol": manifest.stem, "method": method, "shots": shots, "seed": args.seed, "steps": args.steps,
        "start": spec.start,
        "test_episodes": summary["test_episodes"], "accuracy": summary["accuracy"], "ci95": summary["accuracy_ci95"],
        "best_val_acc": float(best.best_model_score) if best.best_model_score is not None else None,
        "wall_s": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "in_channels": args.in_channels, "normalisation": summary["normalisation"], "backbone": settings["backbone"],
        "run_settings": run_settings(args),
    }  # fmt: skip


def run_settings(args: argparse.Namespace) -> dict[str, object]:
    """What a row depends on besides its protocol, method, shots, seed and environment: a resumed row must match it."""
    return {"steps": args.steps, "val_episodes": args.val_episodes, "test_episodes": args.test_episodes,
            "in_channels": args.in_channels, "backbone": args.backbone,
            "set": [f"{key}={value}" for key, value in args.raw_settings]}  # fmt: skip


def saved_row(path: Path, args: argparse.Namespace) -> dict[str, object]:
    """An earlier invocation's row; ``SystemExit`` naming the file if it ran with other settings than this invocation."""
    row = json.loads(path.read_text())
    wanted, recorded = run_settings(args), row.get("run_settings")
    if recorded is None:  # written before rows recorded their settings: check what such a row has
        if args.backbone or args.raw_settings:
            raise SystemExit(f"{path}: written before rows recorded --backbone and --set, so it cannot be told whether "
                             "it ran with them; use another --out, or delete the file to run it again")  # fmt: skip
        wanted = {key: wanted[key] for key in ("steps", "test_episodes", "in_channels")}
        recorded = {key: row.get(key) for key in wanted}
    differ = [f"{key} {recorded.get(key)!r} there, {value!r} now" for key, value in wanted.items() if recorded.get(key) != value]
    if differ:
        raise SystemExit(f"{path}: an earlier run with other settings ({'; '.join(differ)}); its figures would be "
                         "reported as this run's: use another --out, or delete the file to run it again")  # fmt: skip
    return row


def run_name(protocol: str, method: str, shots: int, seed: int) -> str:
    """The name of one run's results and checkpoints in ``--out``: seed 0's carries no seed (as before seeds)."""
    return f"{protocol}-{method}-{shots}{seed_suffix(seed)}"


def seed_suffix(seed: int) -> str:
    """``""`` for seed 0, else ``"-seed<N>"``."""
    return f"-seed{seed}" if seed else ""


def best_checkpoint(out: Path, protocol: str, method: str, shots: int, seed: int = 0) -> Path:
    """The meta-val-selected checkpoint of an earlier run of ``method`` with ``seed`` in ``out``."""
    found = sorted((out / "checkpoints" / run_name(protocol, method, shots, seed)).glob("*.ckpt"))
    if len(found) != 1:
        raise SystemExit(f"expected one selected checkpoint of {method} (seed {seed}) for {protocol} {shots}-shot "
                         f"under {out}, found {len(found)}")  # fmt: skip
    return found[0]


def final_checkpoint(out: Path, protocol: str, shots: int, seed: int = 0, *, check: bool = True) -> Path:
    """The last weights of the pre-training of ``protocol``, ``shots`` and ``seed`` in ``out`` (kept beside its selected ones)."""
    path = out / "checkpoints" / f"{run_name(protocol, PRETRAIN, shots, seed)}-final" / "final.ckpt"
    if check and not path.is_file():
        raise SystemExit(f"{path}: the pre-training's last weights are missing (it ran before they were kept); "
                         f"delete {out / 'results' / (run_name(protocol, PRETRAIN, shots, seed) + '.json')} to run it again")  # fmt: skip
    return path


STOPPING = threading.Event()  # set on Ctrl-C: no further run starts
RUNNING: set[subprocess.Popen[str]] = set()  # the runs in progress, stopped on Ctrl-C
RUNS_LOCK = threading.Lock()  # a run starts entirely before, or not at all after, STOPPING is set


def start_run(command: list[str]) -> subprocess.Popen[str] | None:
    """One run's subprocess, registered to be stopped on Ctrl-C; ``None`` once stopping."""
    with RUNS_LOCK:
        if STOPPING.is_set():
            return None
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        RUNNING.add(child)
        return child


def stop_runs() -> None:
    """Stop every run in progress (an interrupted run keeps nothing) and start no other."""
    with RUNS_LOCK:
        STOPPING.set()
        children = list(RUNNING)
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def run_group(protocol: str, shots: int, methods: list[str], args: argparse.Namespace) -> list[dict[str, object]]:
    """Every method of one (protocol, shots) pair, in its own subprocess each; pre-trainings first, then what reuses them."""
    order = list(methods)
    for source in {METHODS[m].source for m in methods if METHODS[m].start == "reuse"} - set(order):
        order.insert(0, source)
    if any(METHODS[m].start == "two_stage" for m in order):
        order.insert(0, PRETRAIN)
    order.sort(key=lambda m: (0 if m in (PRETRAIN, "finetune") else 2 if METHODS[m].start == "reuse" else 1))
    results = []
    for method in order:
        saved = args.out / "results" / f"{run_name(protocol, method, shots, args.seed)}.json"
        if saved.is_file():  # done by an earlier, interrupted invocation with the same --out and settings
            results.append(saved_row(saved, args))
            continue
        command = [sys.executable, __file__, "--single", protocol, method, str(shots), "--data", str(args.data),
                   "--steps", str(args.steps), "--val-episodes", str(args.val_episodes), "--test-episodes",
                   str(args.test_episodes), "--in-channels", str(args.in_channels), "--seed", str(args.seed),
                   "--out", str(args.out),
                   *(["--backbone", args.backbone] if args.backbone else []),
                   *[f"--set={key}={value}" for key, value in args.raw_settings]]  # fmt: skip
        child = start_run(command)
        if child is None:
            break
        with child:
            try:
                stdout, stderr = child.communicate()
            finally:
                with RUNS_LOCK:
                    RUNNING.discard(child)
        if STOPPING.is_set():  # stopped by main(): this run is unfinished and kept nowhere
            break
        if child.returncode != 0:
            raise SystemExit(f"{protocol} {method} {shots}-shot failed:\n{stderr[-3000:]}")
        r = json.loads(stdout.strip().splitlines()[-1])
        results.append(r)
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(r) + "\n")
        print(f"{protocol} {method:22s} {shots}-shot seed {args.seed}  {100 * r['accuracy']:5.1f}% ± {100 * r['ci95']:.1f}  "
              f"val {100 * (r['best_val_acc'] or 0):5.1f}%  {r['wall_s']:6.1f} s  peak {r['peak_rss_mb']:6.0f} MB", flush=True)  # fmt: skip
    return results


def environment() -> dict[str, object]:
    """What the figures depend on besides the code: Python, platform, CPU, GPU and every installed package's version."""
    import torch

    packages = {dist.metadata["Name"].lower(): dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "packages": dict(sorted(packages.items()))}  # fmt: skip


def check_environment(out: Path, current: dict[str, object], *, allow_new: bool) -> list[str]:
    """Record ``current`` in ``<out>/environment.json``; refuse one that differs from the recorded one unless ``allow_new``.

    Returns what differs (empty when nothing does). Rows resumed from an earlier invocation are
    only comparable with new ones when both ran in the same environment.
    """
    path = out / "environment.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")
        return []
    recorded = json.loads(path.read_text())
    changed = environment_changes(recorded, current)
    if changed and not allow_new:
        raise SystemExit(
            f"{out} holds results from another environment ({path}); their rows would not be comparable with new ones:\n  "
            + "\n  ".join(changed[:20]) + "\nuse a new --out, or --allow-new-environment to add rows anyway (the change is recorded)"
        )
    if changed:
        recorded.setdefault("later", []).append(current)
        path.write_text(json.dumps(recorded, indent=2) + "\n")
    return changed


def environment_changes(recorded: dict[str, object], current: dict[str, object]) -> list[str]:
    """What differs between two recorded environments: Python, CPU, GPU and each package's version."""
    changed = [f"{key}: {recorded.get(key)} -> {current.get(key)}" for key in ("python", "cpu", "cuda") if recorded.get(key) != current.get(key)]
    old, new = recorded.get("packages", {}), current.get("packages", {})
    changed += [f"{name}: {old.get(name, 'absent')} -> {new.get(name, 'absent')}" for name in sorted({*old, *new})
                if old.get(name) != new.get(name)]  # fmt: skip
    return changed


def write_outputs(results: list[dict[str, object]], out: Path) -> None:
    """``real_data.json``, ``real_data.md`` and ``real_data.png`` (accuracy bars with 95% CI whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "real_data.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| protocol | method | shots | seed | accuracy ± 95% CI | wall time | peak memory |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['protocol']} | {r['method']} | {r['shots']} | {r.get('seed', 0)} | {100 * r['accuracy']:.1f}% ± {100 * r['ci95']:.1f}% | "
             f"{r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |" for r in results]  # fmt: skip
    (out / "real_data.md").write_text("\n".join(rows) + "\n")
    groups = sorted({(r["protocol"], r["shots"]) for r in results})
    methods = [m for m in [PRETRAIN, *METHODS] if any(r["method"] == m for r in results)]
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


def seed_summary(results: list[dict[str, object]], baseline: str = "finetune") -> str:
    """Markdown: each method's test accuracy on every seed in ``results``, their mean and sd, and its gain over ``baseline``.

    The gain is paired: each seed's row minus the baseline's row of the same protocol, shots and
    seed (all seeds share the frozen test episodes), over the seeds both ran (named, when the baseline
    lacks some of the method's seeds). The training seed moves
    a method far more than its 95% CI over episodes says (BENCHMARKS.md), so methods are compared here.
    """
    import statistics

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):+.1f}" if len(values) < 2 else f"{statistics.mean(values):+.1f} (sd {statistics.stdev(values):.1f})"

    def mean(values: list[float]) -> str:
        return spread(values).lstrip("+")

    by_run = {(r["protocol"], r["shots"], r["method"], r.get("seed", 0)): 100 * r["accuracy"] for r in results}
    rows = [f"| protocol | shots | method | seeds | accuracy per seed | mean (sd) | gain over {baseline} per seed | mean gain (sd) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for protocol, shots, method in sorted({key[:3] for key in by_run}, key=lambda k: (k[0], k[1], k[2] != baseline, k[2])):
        seeds = sorted(seed for (p, k, m, seed) in by_run if (p, k, m) == (protocol, shots, method))
        accuracy = [by_run[protocol, shots, method, seed] for seed in seeds]
        paired = [seed for seed in seeds if (protocol, shots, baseline, seed) in by_run]
        gains = [by_run[protocol, shots, method, seed] - by_run[protocol, shots, baseline, seed] for seed in paired]
        per_seed = over = ""  # the baseline itself, or no seed the baseline also ran: no gain to show
        if method != baseline and paired == seeds:  # one gain under each seed of the seeds column
            per_seed, over = " / ".join(f"{g:+.1f}" for g in gains), spread(gains)
        elif method != baseline and paired:  # the baseline lacks some seeds: each gain names its seed
            per_seed = " / ".join(f"seed {seed}: {g:+.1f}" for seed, g in zip(paired, gains))
            over = f"{spread(gains)}, {len(paired)} of {len(seeds)} seeds"
        rows.append(f"| {protocol} | {shots} | {method} | {', '.join(map(str, seeds))} | "
                    f"{' / '.join(f'{a:.1f}' for a in accuracy)} | {mean(accuracy)} | {per_seed} | {over} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def meta_val_selection(results: list[dict[str, object]], baseline: str = "finetune") -> str:
    """Markdown: for each learner, the row meta-val selects on every seed, and its test gain over ``baseline``.

    This is the rule the benchmark claims by: among the rows of one learner (``METHODS[m].learner``;
    e.g. every second-order MAML setting) on one protocol, shots and seed, the one with the best
    meta-val accuracy, never the best test accuracy. A tie on meta-val (to 5 decimals) is named in its
    cell, and the tied row first in ``METHODS`` counts (the simpler setting, listed before its variants).
    The candidates of every seed are listed, as they may differ.
    """
    import statistics

    rows = [f"| protocol | shots | learner | seed | candidates (meta-val %) | selected | test % | gain over {baseline} |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    gains: dict[tuple[object, ...], list[float]] = {}
    order = list(METHODS)

    def meta_val(row: dict[str, object]) -> float:
        """A float32 mean over episodes: the same count of right answers can differ in the 8th digit."""
        return round(float(row["best_val_acc"]), 5)

    chosen = [r for r in results if r["method"] in METHODS and r.get("best_val_acc") is not None]
    keys = {(r["protocol"], r["shots"], METHODS[str(r["method"])].learner, r.get("seed", 0)) for r in chosen}
    for protocol, shots, learner, seed in sorted(keys):
        same = [r for r in chosen if (r["protocol"], r["shots"], METHODS[str(r["method"])].learner, r.get("seed", 0))
                == (protocol, shots, learner, seed)]  # fmt: skip
        same.sort(key=lambda r: (-meta_val(r), order.index(str(r["method"]))))
        best, tied = same[0], [str(r["method"]) for r in same[1:] if meta_val(r) == meta_val(same[0])]
        base = next((r for r in results if (r["protocol"], r["shots"], r["method"], r.get("seed", 0))
                     == (protocol, shots, baseline, seed)), None)  # fmt: skip
        gain = 100 * (float(best["accuracy"]) - float(base["accuracy"])) if base else None
        if gain is not None:
            gains.setdefault((protocol, shots, learner), []).append(gain)
        candidates = ", ".join(f"{r['method']} ({100 * float(r['best_val_acc']):.1f})" for r in same)
        rows.append(f"| {protocol} | {shots} | {learner} | {seed} | {candidates} | {best['method']}"
                    f"{' (tie: ' + ', '.join(tied) + ')' if tied else ''} | {100 * float(best['accuracy']):.1f} | "
                    f"{'' if gain is None else f'{gain:+.1f}'} |")  # fmt: skip
    rows += ["", f"| protocol | shots | learner | seeds | mean gain of the selected row over {baseline} (sd) |", "|---|---|---|---|---|"]
    for (protocol, shots, learner), values in sorted(gains.items()):
        sd = f" (sd {statistics.stdev(values):.1f})" if len(values) > 1 else ""
        rows.append(f"| {protocol} | {shots} | {learner} | {len(values)} | {statistics.mean(values):+.1f}{sd} |")
    return "\n".join(rows) + "\n"


def saved_results(out: Path) -> list[dict[str, object]]:
    """Every row in ``<out>/results``: all seeds and invocations, not only the last one's."""
    return [json.loads(path.read_text()) for path in sorted((out / "results").glob("*.json"))]


def merged_results(outs: list[Path], *, allow_new_environment: bool = False) -> list[dict[str, object]]:
    """Every row of several ``--out`` folders (e.g. one seed per folder, run side by side), checked to be comparable.

    ``SystemExit`` naming the files when two folders ran in other environments (unless
    ``allow_new_environment``), with other settings, or on other protocol manifests (so other test
    episodes), or when one run (protocol, method, shots, seed) gave other figures in two folders. A run
    found with the same figures in several folders (a shared pre-training, run in each) counts once.
    """
    rows: dict[tuple[object, ...], tuple[Path, dict[str, object]]] = {}
    first: dict[str, tuple[Path, object]] = {}  # what every folder must share, and where it was first seen

    def same(what: str, path: Path, value: object, explain: str) -> None:
        seen = first.setdefault(what, (path, value))
        if seen[1] != value:
            raise SystemExit(f"{seen[0]} and {path}: {explain}; their rows cannot be summarised together")

    for out in outs:
        paths = sorted((out / "results").glob("*.json"))
        if not paths:
            raise SystemExit(f"{out}: no results (expected {out / 'results'}/*.json from a real_data.py run)")
        environment_path = out / "environment.json"
        recorded = json.loads(environment_path.read_text()) if environment_path.is_file() else {}
        base_path, base = first.setdefault("environment", (environment_path, recorded))
        changed = environment_changes(base, recorded)  # type: ignore[arg-type]
        if changed and not allow_new_environment:
            raise SystemExit(f"{base_path} and {environment_path}: other environments ({'; '.join(changed[:5])}); "
                             "their rows are not comparable (--allow-new-environment to summarise them anyway)")  # fmt: skip
        if changed:
            print(f"warning: {environment_path} differs from {base_path}: {'; '.join(changed[:5])}", file=sys.stderr)
        for path in paths:
            try:
                row = json.loads(path.read_text())
                row["protocol"], row["shots"], row["method"], row["accuracy"]  # noqa: B018 - what a result row has
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}: not a real_data.py result row ({error!r})") from None
            same("steps", path, [row.get(key) for key in ("steps", "test_episodes", "in_channels")],
                 "runs made with other steps, test episodes or channels")  # what every row records
            if "run_settings" in row:  # rows before it could not record --backbone and --set
                same("settings", path, row["run_settings"], "runs made with other settings")
            protocol = str(row["protocol"])
            manifest = out / f"{protocol}.csv"
            same(f"manifest {protocol}", manifest, manifest.read_bytes() if manifest.is_file() else None,
                 f"other {protocol} manifests, so other classes or test episodes")  # fmt: skip
            key = (row["protocol"], row["shots"], row["method"], row.get("seed", 0))
            if key in rows and (rows[key][1]["accuracy"], rows[key][1].get("best_val_acc")) != (row["accuracy"], row.get("best_val_acc")):
                raise SystemExit(f"{rows[key][0]} and {path}: the same run gave other figures "
                                 f"({100 * float(rows[key][1]['accuracy']):.2f}% against {100 * float(row['accuracy']):.2f}%)")  # fmt: skip
            rows.setdefault(key, (path, row))
    return [row for _, row in rows.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding mednist-mini/ and realdev/ (read only)")
    parser.add_argument("--protocols", nargs="+", default=list(MAIN_PROTOCOLS), choices=list(PROTOCOLS),
                        help="R1, R2 (default) and R1o, R2o (the same test domains, an orientation-free meta-val)")
    parser.add_argument("--algorithms", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; all: {' '.join(METHODS)})")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--in-channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and the training (the episodes stay seed 0's); kept apart in --out")
    parser.add_argument("--quick", action="store_true", help="4 steps, 4 val and 8 test episodes (a smoke test)")
    parser.add_argument("--backbone", help="backbone class path or short name for every method (default: Conv-4, 32 channels)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="raw_settings",
                        help="a learner, backbone or module setting for every method that has it (e.g. hidden_channels=64)")
    parser.add_argument("--jobs", type=int, default=1, help="(protocol, shots) pairs run side by side (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/real_data"))
    parser.add_argument("--allow-new-environment", action="store_true",
                        help="add rows to an --out whose earlier rows ran with other package versions, Python or CPU")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="OUT",
                        help="run nothing: print seeds.md over the rows of these --out folders (e.g. one seed each)")
    parser.add_argument("--single", nargs=3, metavar=("PROTOCOL", "METHOD", "SHOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarise:
        kept = merged_results(args.summarise, allow_new_environment=args.allow_new_environment)
        print(seed_summary(kept) + "\n## Selected on meta-val\n\n" + meta_val_selection(kept), end="")
        return
    if args.quick:
        args.steps, args.val_episodes, args.test_episodes = 4, 4, 8
    if not 0 <= args.seed <= 2**32 - 1:  # Lightning would replace a seed out of this range by a random one
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    missing = [DOMAINS[d][0] for d in DOMAINS if not (args.data / DOMAINS[d][0] / "manifest.csv").is_file()]
    if missing:
        parser.error(f"the data sets {', '.join(missing)} are not under {args.data} (--data)")
    args.out = args.out.resolve()
    args.raw_settings = [item.split("=", 1) for item in args.raw_settings]
    if any(len(item) != 2 for item in args.raw_settings):
        parser.error("--set takes KEY=VALUE")
    args.settings = {key: yaml.safe_load(value) for key, value in args.raw_settings}
    if args.single:
        protocol, method, shots = args.single
        print(json.dumps(run_one(args.out / f"{protocol}.csv", method, int(shots), args)))
        return
    changed = check_environment(args.out, environment(), allow_new=args.allow_new_environment)
    if changed:
        print(f"warning: the environment changed since earlier rows in {args.out}: {'; '.join(changed[:5])}", file=sys.stderr)
    for kept in sorted((args.out / "results").glob("*.json")):  # seeds.md sums up every row: all must share the settings
        saved_row(kept, args)
    for protocol in args.protocols:
        build_protocol(protocol, args.data, args.out)
    groups = [(protocol, shots) for protocol in args.protocols for shots in args.shots]
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # one thread per side-by-side run
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        done = [pool.submit(run_group, protocol, shots, args.algorithms, args) for protocol, shots in groups]
        results = [r for future in done for r in future.result()]
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        stop_runs()
        pool.shutdown(cancel_futures=True)
        print(f"interrupted: the finished runs are kept in {args.out / 'results'}; the same command with the same --out "
              "goes on from them", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    pool.shutdown()
    write_outputs(results, args.out)
    kept = saved_results(args.out)
    (args.out / "seeds.md").write_text(seed_summary(kept) + "\n## Selected on meta-val\n\n" + meta_val_selection(kept))
    print(f"wrote {args.out / 'real_data.md'} and {args.out / 'real_data.png'} (this run), {args.out / 'seeds.md'} (every seed in --out)")


if __name__ == "__main__":
    main()
