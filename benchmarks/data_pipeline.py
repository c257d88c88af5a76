"""Data pipeline speed: DICOM/NIfTI decoding, episode assembly, and time a training step waits on data.

Usage: python benchmarks/data_pipeline.py [--out results.json]

For 2D (84x84 DICOM) and 3D (32^3 NIfTI) synthetic lesion sets written to a temporary folder,
reports: files decoded per second while building the cache, episodes per second assembled from
the cache with and without augmentation, and the fraction of a second-order MAML training step
spent waiting for the next batch (single process, num_workers=0, the CPU default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medmeta.algorithms import MAML
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.synthetic import generate_synthetic_dataset
from medmeta.data.synthetic3d import generate_synthetic_volumes
from medmeta.networks import Conv4


def _episodes_per_second(dataset: torch.utils.data.Dataset, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def measure(root: Path, *, spatial_dims: int, image_size: int, hidden: int) -> dict[str, float]:
    """Figures for one data set."""
    data = EpisodicDataModule(
        str(root), spatial_dims=spatial_dims, image_size=image_size, n_way=5, k_shot=1, q_query=15 if spatial_dims == 2 else 5,
        meta_batch_size=4, train_batches_per_epoch=20, window=(-1100, 400), preflight=False,
    )  # fmt: skip
    start = time.perf_counter()
    data.setup("fit")
    load_s = time.perf_counter() - start
    n_files = sum(len(d.images) for d in data._datasets.values())
    train = data._datasets["train"]
    with_aug = _episodes_per_second(train, 40)
    train.augment, aug = None, train.augment
    without_aug = _episodes_per_second(train, 40)
    train.augment = aug

    model = Conv4(in_channels=1, n_way=5, hidden_channels=hidden, spatial_dims=spatial_dims, image_size=image_size)
    algo, optimiser = MAML(model, inner_lr=0.05, inner_steps=5), torch.optim.Adam(model.parameters(), 1e-3)
    waits, steps = [], []
    loader = iter(data.train_dataloader())
    for _ in range(12):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        optimiser.zero_grad()
        algo.outer_loss(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"]).backward()
        optimiser.step()
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t0)
    waits, steps = waits[2:], steps[2:]  # after warm-up
    return {
        "files": n_files,
        "files_decoded_per_s": n_files / load_s,
        "episodes_per_s_augmented": with_aug,
        "episodes_per_s_plain": without_aug,
        "median_step_s": statistics.median(steps),
        "data_wait_fraction": sum(waits) / sum(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": "cpu", "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root2d = generate_synthetic_dataset(Path(tmp) / "2d", n_classes=30, image_size=84)
        results["2d_84"] = measure(root2d, spatial_dims=2, image_size=84, hidden=32)
        root3d = generate_synthetic_volumes(Path(tmp) / "3d", n_classes=30)
        results["3d_32"] = measure(root3d, spatial_dims=3, image_size=32, hidden=16)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
