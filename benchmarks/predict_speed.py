"""``medmeta predict`` throughput on the CPU: cases per second, reading and preflight included.

Usage: python benchmarks/predict_speed.py [--cases-2d 500] [--cases-3d 50] [--batch-size 32] [--out results.json]

Writes synthetic cohorts to a temporary folder: 2D 64x64 DICOM slices (the synthetic lesion set),
the same slices as 8-bit PNG, and 3D 64^3 NIfTI volumes. Each cohort is predicted by
:func:`medmeta.predict.predict_cohort` with a bundle this script saves and loads itself
(``save_bundle``/``load_bundle``): an untrained Conv-4 with group norm, as the repository's configs
size it (2D: 32 channels at 64x64; 3D: 16 channels at 24^3, ``configs/synthetic_3d.yaml``). The
weights do not change the speed. Reported per cohort: cases, wall time of the whole run (discovery,
preflight, load transforms, forward, CSV writes with fsync, JSON), cases/s, cases per CPU-second
of the process (all its threads: the figure to compare on a machine shared with other work), and
the share of the time spent in the network's forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medmeta.adapted import AdaptedClassifier
from medmeta.bundle import Bundle, load_bundle, save_bundle
from medmeta.data.dicom import read_dicom
from medmeta.data.synthetic import generate_synthetic_dataset
from medmeta.data.synthetic3d import generate_synthetic_volumes
from medmeta.predict import predict_cohort

WINDOW = (-1100.0, 400.0)


def make_bundle(folder: Path, *, spatial_dims: int, image_size: int, hidden: int) -> Bundle:
    """An untrained 5-class Conv-4 (group norm) saved as a bundle and loaded back."""
    torch.manual_seed(0)
    spec = {"class_path": "conv4", "init_args": {"hidden_channels": hidden, "norm": "group"}}
    shape = {"in_channels": 1, "spatial_dims": spatial_dims, "image_size": image_size}
    network = AdaptedClassifier(spec, n_classes=5, **shape).eval()
    network_def = {"_target_": "medmeta.adapted.AdaptedClassifier", "backbone": spec, "n_classes": 5, **shape}
    settings = {**shape, "window": WINDOW, "preset": None, "spacing": None, "roi_size": None}
    save_bundle(folder, network, network_def, [f"class{k}" for k in range(5)], settings, {})
    return load_bundle(folder)


def cohorts(root: Path, cases_2d: int, cases_3d: int) -> dict[str, Path]:
    """The three cohorts: DICOM and PNG slices (the same images), NIfTI volumes."""
    per_patient = 5
    dicom = generate_synthetic_dataset(root / "dicom", n_classes=10, patients_per_class=max(1, cases_2d // 50),
                                       images_per_patient=per_patient, image_size=64, seed=0)  # fmt: skip
    png = root / "png"
    for path in sorted(dicom.rglob("*.dcm")):
        hu, _ = read_dicom(path)
        grey = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 255, 0, 255).astype(np.uint8)
        target = png / path.relative_to(dicom).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).save(target)
    nifti = generate_synthetic_volumes(root / "nifti", n_classes=10, patients_per_class=max(1, cases_3d // 10),
                                       volumes_per_patient=1, size=64, seed=0)  # fmt: skip
    return {"2D DICOM 64x64": dicom, "2D PNG 64x64": png, "3D NIfTI 64^3": nifti}


def measure(bundle: Bundle, cohort: Path, out: Path, batch_size: int) -> dict[str, float]:
    """One full ``predict_cohort`` run: cases, seconds, cases/s and the forward's share of the time."""
    forward: list[float] = []  # the start, then the duration, of every forward
    pre = bundle.network.register_forward_pre_hook(lambda *_: forward.append(time.perf_counter()))
    post = bundle.network.register_forward_hook(lambda *_: forward.append(time.perf_counter() - forward.pop()))
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = predict_cohort(bundle, [cohort], out, batch_size=batch_size, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        pre.remove()
        post.remove()
    assert result.predicted == result.cases and not result.stopped, result
    return {"cases": result.cases, "seconds": seconds, "cases_per_s": result.cases / seconds,
            "cases_per_cpu_s": result.cases / cpu_seconds, "forward_share": sum(forward) / seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases-2d", type=int, default=500, help="2D cases per format (a multiple of 50)")
    parser.add_argument("--cases-3d", type=int, default=50, help="3D volumes (a multiple of 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # optional GPU codecs: noise here
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundles = {2: make_bundle(root / "bundle2d", spatial_dims=2, image_size=64, hidden=32),
                   3: make_bundle(root / "bundle3d", spatial_dims=3, image_size=24, hidden=16)}  # fmt: skip
        for name, cohort in cohorts(root / "data", args.cases_2d, args.cases_3d).items():
            dims = 3 if name.startswith("3D") else 2
            figures = measure(bundles[dims], cohort, root / "out" / name.replace(" ", "_"), args.batch_size)
            rows.append({"cohort": name, "model_input": f"{bundles[dims].image_settings['image_size']}^{dims}", **figures})
    command = shlex.join(["python", "benchmarks/predict_speed.py", *sys.argv[1:]])
    print(f"medmeta predict throughput, CPU ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")  # fmt: skip
    print("| cohort | model input | cases | seconds | cases/s | cases per CPU-second | forward share |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cohort']} | {row['model_input']} | {row['cases']} | {row['seconds']:.1f} | "
              f"{row['cases_per_s']:.1f} | {row['cases_per_cpu_s']:.1f} | {100 * row['forward_share']:.0f}% |")  # fmt: skip
    print(f"command: {command}")
    if args.out is not None:
        args.out.write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                        "batch_size": args.batch_size, "results": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
