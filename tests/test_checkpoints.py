"""``medmeta.checkpoints``: loading trained models, files that are not checkpoints, the classes a model has seen.

Crafted pickles and model-shape mismatches through the CLI are in ``test_reliability.py``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from medmeta import FewShotModule
from medmeta.checkpoints import load_trained, model_hparams, read_checkpoint
from medmeta.errors import DataError
from tests.conftest import module_for

# FewShotModule's flat hyperparameters before learners and backbones were plug-ins, with their defaults then:
# what every checkpoint written by medmeta before that change holds.
OLD_HPARAMS: dict[str, object] = dict(
    algorithm="maml", n_way=5, in_channels=1, image_size=32, spatial_dims=2, backbone="conv4", hidden_channels=64,
    norm="batch", norm_mode="transductive", inner_lr=0.4, inner_steps=5, eval_inner_steps=10, first_order=False,
    task_reduction="mean", task_parallel="auto", checkpoint_inner_steps=False, cuda_graph=False,
    distance="squared_euclidean", protonet_temperature=1.0, pretrain_classes=64, finetune_steps=100, finetune_lr=0.01,
    finetune_scope="head", multi_step_loss=True, multi_step_loss_epochs=10, per_step_norm_weights=True,
    learn_inner_lrs=True, first_order_epochs=0, mann_controller="feedforward", mann_memory_slots=32,
    mann_key_strength=10.0, mann_label_timing="current", cosine_annealing=False, meta_lr=1e-3, pixel_baseline=True,
    nonfinite="stop",
)  # fmt: skip


def _checkpoint(path: Path, module: FewShotModule, hparams: dict[str, object] | None = None) -> Path:
    """``module``'s weights saved as a checkpoint, with its own hyperparameters or ``hparams`` in their place."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams if hparams is None else hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


def _old(drop: tuple[str, ...] = (), **settings: object) -> dict[str, object]:
    """Old flat hyperparameters: the old defaults with ``settings``, less the keys in ``drop`` (older still)."""
    return {k: v for k, v in {**OLD_HPARAMS, **settings}.items() if k not in drop}


def _same_weights(a: FewShotModule, b: FewShotModule) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


@pytest.mark.parametrize("algorithm", ["maml", "maml_pp", "meta_sgd", "anil", "finetune"])
def test_a_checkpoint_with_the_old_flat_hyperparameters_loads(tmp_path: Path, algorithm: str) -> None:
    """``algorithm: maml, inner_lr: ..., hidden_channels: ...``: the same weights and the same learner and backbone."""
    torch.manual_seed(0)
    steps = {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 3} if algorithm != "finetune" else {"finetune_steps": 7}
    module = module_for(algorithm, n_way=3, image_size=8, hidden_channels=4, norm="group", pixel_baseline=False, **steps)
    old = _old(algorithm=algorithm, n_way=3, image_size=8, hidden_channels=4, norm="group", pixel_baseline=False,
               **{"inner_lr": 0.4, "inner_steps": 5, "eval_inner_steps": 10, **steps})  # fmt: skip
    loaded, _ = load_trained(_checkpoint(tmp_path / "old.ckpt", module, old))
    _same_weights(module, loaded)
    expected = dict(module.hparams)
    if algorithm == "finetune":  # a setting added since: the value old runs used, not today's default
        expected["algorithm"] = {**expected["algorithm"],
                                 "init_args": {**expected["algorithm"]["init_args"], "finetune_optimizer": "adam"}}  # fmt: skip
        assert loaded.algorithm.finetune_optimizer == "adam" and module.algorithm.finetune_optimizer == "sgd"
    assert loaded.hparams["algorithm"] == expected["algorithm"]
    assert loaded.hparams["backbone"] == module.hparams["backbone"]
    assert dict(loaded.hparams) == expected
    if algorithm != "finetune":
        assert loaded.algorithm.eval_inner_steps == 3 and loaded.algorithm.inner_lr == 0.1


def test_a_setting_added_since_a_checkpoint_takes_the_value_it_was_written_with(tmp_path: Path) -> None:
    """A plug-in spec checkpoint from before ``finetune_optimizer`` existed fitted its heads with Adam, and still does."""
    module = module_for("finetune", n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    hparams = dict(module.hparams)
    older = {k: v for k, v in hparams["algorithm"]["init_args"].items() if k != "finetune_optimizer"}
    loaded, _ = load_trained(_checkpoint(tmp_path / "older.ckpt", module,
                                         {**hparams, "algorithm": {**hparams["algorithm"], "init_args": older}}))  # fmt: skip
    assert loaded.algorithm.finetune_optimizer == "adam"
    _same_weights(module, loaded)
    today, _ = load_trained(_checkpoint(tmp_path / "today.ckpt", module))
    assert today.algorithm.finetune_optimizer == "sgd" and dict(today.hparams) == hparams  # today's checkpoints name theirs


def test_old_hyperparameters_translate_to_plain_specs() -> None:
    """What ``model_hparams`` makes of an old MAML checkpoint: class-path specs, Lightning's keys dropped."""
    old = _old(inner_steps=1, eval_inner_steps=2, first_order=True, hidden_channels=8, _instantiator="x")
    hparams = model_hparams({"hyper_parameters": old})
    assert hparams["algorithm"] == {
        "class_path": "medmeta.algorithms.maml.MAML",
        "init_args": {"inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 2, "first_order": True,
                      "task_reduction": "mean", "task_parallel": "auto", "checkpoint_inner_steps": False,
                      "support_augment": False, "query_augment": False, "zero_head": False},  # settings added since: what old runs did
    }  # fmt: skip
    assert hparams["backbone"] == {
        "class_path": "medmeta.networks.conv4.Conv4",
        "init_args": {"hidden_channels": 8, "norm": "batch", "feature_levels": "last"},  # added since: what old runs had
    }
    parameters = inspect.signature(FewShotModule).parameters  # settings added since default to what old runs did
    assert set(hparams) <= set(parameters)
    assert all(parameters[name].default is not inspect.Parameter.empty for name in set(parameters) - set(hparams))
    assert model_hparams({"hyper_parameters": hparams}) == hparams  # today's checkpoints pass unchanged


@pytest.mark.parametrize(("drop", "expected"), [((), "current"), (("mann_label_timing",), "previous")])
def test_a_mann_checkpoint_keeps_the_label_timing_it_was_trained_with(
    tmp_path: Path, drop: tuple[str, ...], expected: str
) -> None:
    """Checkpoints from before ``mann_label_timing`` existed were trained with one-step-late labels."""
    module = module_for("mann", n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    old = _old(drop, algorithm="mann", n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    loaded, _ = load_trained(_checkpoint(tmp_path / "mann.ckpt", module, old))
    assert loaded.algorithm.label_timing == expected
    _same_weights(module, loaded)
    new, _ = load_trained(_checkpoint(tmp_path / "new.ckpt", module))
    assert new.algorithm.label_timing == "current"  # today's checkpoints name theirs


def _not_checkpoints(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not (complete) checkpoints, each with the words its refusal must hold."""
    data = good.read_bytes()
    files = {
        "random-bytes": (np.random.default_rng(0).bytes(5000), "neither a zip archive nor a pickle"),
        "text": (b"epoch: 3\nval/acc: 0.61\nthis is a text file\n", "it is a text file"),
        "truncated": (data[: len(data) // 2], "the file is truncated"),
        "truncated-at-the-end": (data[:-30], "the file is truncated"),
        "empty": (b"", "the file is empty (0 bytes)"),
    }
    written = {}
    for name, (content, words) in files.items():
        path = folder / f"{name}.ckpt"
        path.write_bytes(content)
        written[name] = (path, words)
    return written


@pytest.mark.parametrize("name", ["random-bytes", "text", "truncated", "truncated-at-the-end", "empty"])
def test_a_file_that_is_not_a_complete_checkpoint_is_one_clear_line(tmp_path: Path, name: str) -> None:
    module = module_for(n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    path, words = _not_checkpoints(tmp_path, _checkpoint(tmp_path / "good.ckpt", module))[name]
    with pytest.raises(DataError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"cannot load checkpoint {path}: ") and words in message, message
    assert "checkpoint" in message.removeprefix(f"cannot load checkpoint {path}: "), message  # says what it is not
    assert "\n" not in message and not message.endswith(("(", ":", ",")), message
    for riddle in ("objects other than tensors", "IndexError", "KeyError", "OSError", "EOFError"):
        assert riddle not in message, message


def test_weights_with_nan_or_inf_are_refused_naming_the_tensors(tmp_path: Path) -> None:
    """A diverged training's weights would give NaN probabilities, scored as class 0: refused on load."""
    module = module_for(n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    good = _checkpoint(tmp_path / "good.ckpt", module)
    assert load_trained(good)[0] is not None
    state = module.state_dict()
    floating = [name for name, value in state.items() if value.is_floating_point()]
    state[floating[0]].view(-1)[0] = float("nan")
    state[floating[-1]].view(-1)[-1] = float("-inf")
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, tmp_path / "diverged.ckpt")
    with pytest.raises(DataError) as caught:
        load_trained(tmp_path / "diverged.ckpt")
    assert str(caught.value) == (
        f"cannot load checkpoint {tmp_path / 'diverged.ckpt'}: 2 weight tensor(s) hold NaN or infinite values "
        f"({floating[0]}, {floating[-1]}); every prediction from them would be meaningless (a diverged training or a "
        "damaged file)"
    )


def test_fit_records_the_classes_the_model_has_seen(trained_checkpoint: Path, tmp_path: Path) -> None:
    """Meta-train and meta-val class names go into the checkpoint; old checkpoints fall back to the run folder."""
    from medmeta.checkpoints import SEEN_CLASSES_KEY, seen_classes

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    seen = seen_classes(trained_checkpoint, checkpoint)
    assert seen is not None and len(seen["train"]) == 6 and len(seen["val"]) == 3
    assert checkpoint[SEEN_CLASSES_KEY] == seen and not set(seen["train"]) & set(seen["val"])
    old = {k: v for k, v in checkpoint.items() if k != SEEN_CLASSES_KEY}
    assert seen_classes(tmp_path / "model.ckpt", old) is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    splits = {"train": ["b", "a"], "val": ["c"], "test": ["d"]}
    (tmp_path / "run" / "class_splits.json").write_text(json.dumps(splits))
    assert seen_classes(tmp_path / "run" / "checkpoints" / "last.ckpt", old) == {"train": ["a", "b"], "val": ["c"]}


@pytest.mark.parametrize(("drop", "expected"), [((), 0.1), (("protonet_temperature",), 1.0)])
def test_a_protonet_checkpoint_keeps_its_temperature(tmp_path: Path, drop: tuple[str, ...], expected: float) -> None:
    """Old checkpoints held ``protonet_temperature`` (now ProtoNet's ``temperature``); older ones trained with 1."""
    module = module_for("protonet", distance="cosine", temperature=0.1, n_way=3, image_size=8, hidden_channels=4,
                        pixel_baseline=False)  # fmt: skip
    old = _old(drop, algorithm="protonet", distance="cosine", protonet_temperature=0.1, n_way=3, image_size=8,
               hidden_channels=4, pixel_baseline=False)  # fmt: skip
    loaded, _ = load_trained(_checkpoint(tmp_path / "protonet.ckpt", module, old))
    assert loaded.algorithm.temperature == expected and loaded.algorithm.distance == "cosine"
    new, _ = load_trained(_checkpoint(tmp_path / "new.ckpt", module))
    assert new.algorithm.temperature == 0.1


def test_medmeta_test_runs_a_checkpoint_with_the_old_flat_hyperparameters(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``medmeta test --ckpt_path OLD.ckpt``: the old settings are translated and replace the command line's."""
    from tests.test_cli import _medmeta_here, _tiny_fit_args

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    new = checkpoint["hyper_parameters"]  # conftest's trained model: 3-way, hidden_channels 8, eval_inner_steps 3
    checkpoint["hyper_parameters"] = _old(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=3,
                                          pixel_baseline=False)  # fmt: skip
    assert model_hparams(checkpoint)["algorithm"] == new["algorithm"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    args = _tiny_fit_args(tiny_dicom_root, tmp_path / "run")
    args[0] = "test"
    status, printed = _medmeta_here(*args, "--ckpt_path", str(tmp_path / "old.ckpt"), cwd=tmp_path, capsys=capsys,
                                    monkeypatch=monkeypatch)  # fmt: skip
    assert status == 0, printed[-3000:]
    assert "test accuracy:" in printed
    (metrics,) = (tmp_path / "run").rglob("metrics.json")
    summary = json.loads(metrics.read_text())
    assert summary["algorithm"] == "maml-second-order" and summary["eval_inner_steps"] == 3  # the checkpoint's, not 2


def test_fit_records_the_kinds_of_its_training_images(trained_checkpoint: Path, tmp_path: Path) -> None:
    """Format families and native channel counts go into the checkpoint; without them nothing is known (no warning)."""
    from medmeta.data.image_kinds import TRAINING_IMAGES_KEY, kind_warning

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    assert checkpoint[TRAINING_IMAGES_KEY] == {"dicom": [1]}  # the tiny set: grey CT DICOM
    module, _ = load_trained(trained_checkpoint)
    assert module.training_images == {"dicom": [1]}
    warning = kind_warning(("picture", 3), module.training_images)
    assert warning == ("a colour PNG/JPEG image, but the model was trained on grey DICOM images: its prediction may not "
                       "mean anything")  # fmt: skip
    assert kind_warning(("picture", 1), module.training_images).startswith("a grey PNG/JPEG image, but")
    assert kind_warning(("dicom", 3), module.training_images).startswith("a colour DICOM image, but")
    assert kind_warning(("dicom", 1), module.training_images) is None
    assert kind_warning(("dicom", None), {"dicom": [1]}) is None  # channels unknown: the family alone is checked
    torch.save({k: v for k, v in checkpoint.items() if k != TRAINING_IMAGES_KEY}, tmp_path / "old.ckpt")
    old, _ = load_trained(tmp_path / "old.ckpt")
    assert old.training_images is None and kind_warning(("picture", 3), old.training_images) is None
