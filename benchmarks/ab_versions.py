"""Side by side in one process: the meta-step of this checkout's learners against another medmeta version's.

Usage:
    git worktree add --detach /tmp/medmeta_old 935ce61
    python benchmarks/ab_versions.py --old /tmp/medmeta_old [--cases maml-loop maml-vmap meta_sgd-loop maml_pp-loop]

The other version's package is copied to a temporary folder as ``medmeta_old`` (its imports
renamed), so both run in one process on the same Conv-4 weights and the same 5-way 1-shot 15-query
episodes (28x28, meta-batch 4, 5 inner steps at 0.4). Prints whether their meta-gradients are
bitwise equal and the ratio of their median meta-step times (12 steps each, alternating, the first
two dropped).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {"maml-loop": ("MAML", "loop"), "maml-vmap": ("MAML", "vmap"), "meta_sgd-loop": ("MetaSGD", "loop"),
         "maml_pp-loop": ("MAMLPlusPlus", "loop")}  # fmt: skip


def import_old(tree: Path, folder: Path) -> object:
    """The other checkout's ``medmeta`` package, copied into ``folder`` and imported as ``medmeta_old``."""
    shutil.copytree(tree / "medmeta", folder / "medmeta_old")
    for path in (folder / "medmeta_old").rglob("*.py"):
        text = re.sub(r"\bmedmeta\.", "medmeta_old.", path.read_text())
        path.write_text(re.sub(r"from medmeta import", "from medmeta_old import", text))
    sys.path.insert(0, str(folder))
    import medmeta_old.algorithms  # noqa: F401 - imported for its side effect: the package in sys.modules

    return sys.modules["medmeta_old"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the other medmeta version")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medmeta_old_") as folder:
        run(import_old(args.old, Path(folder)), args)


def run(old: object, args: argparse.Namespace) -> None:
    """Time ``args.cases`` of the other version (``old``, the imported package) against this checkout's."""
    import medmeta.algorithms as new_algorithms
    from medmeta.networks import Conv4

    old_algorithms, old_networks = old.algorithms, sys.modules["medmeta_old.networks"]
    torch.manual_seed(0)
    tasks, n_way, side = 4, 5, 28
    sx, qx = torch.randn(tasks, n_way, 1, side, side), torch.randn(tasks, n_way * 15, 1, side, side)
    sy = torch.arange(n_way).expand(tasks, -1).clone()
    qy = torch.arange(n_way).repeat_interleave(15).expand(tasks, -1).clone()
    old_model = old_networks.Conv4(in_channels=1, n_way=n_way, hidden_channels=64, image_size=side)
    new_model = Conv4(in_channels=1, n_way=n_way, hidden_channels=64, image_size=side)
    new_model.load_state_dict(old_model.state_dict())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; old: {args.old}")
    for case in args.cases:
        name, parallel = CASES[case]
        impls = {
            "old": getattr(old_algorithms, name)(old_model, inner_lr=0.4, inner_steps=5, task_parallel=parallel),
            "new": getattr(new_algorithms, name)(new_model, inner_lr=0.4, inner_steps=5, task_parallel=parallel),
        }
        grads = {k: torch.autograd.grad(a.outer_loss(sx, sy, qx, qy), list(a.parameters())) for k, a in impls.items()}
        same = all(torch.equal(a, b) for a, b in zip(grads["old"], grads["new"]))
        times: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(12):
            for key in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                torch.autograd.grad(impls[key].outer_loss(sx, sy, qx, qy), list(impls[key].parameters()))
                times[key].append(time.perf_counter() - start)
        before, after = statistics.median(times["old"][2:]), statistics.median(times["new"][2:])
        print(f"{case}: meta-gradients bitwise equal: {same}; median meta-step old {1000 * before:.0f} ms, "
              f"new {1000 * after:.0f} ms, new/old time {after / before:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
