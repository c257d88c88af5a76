"""Pretrained initialisation (``--model.init_from``): medmeta checkpoints and plain state dicts, head re-initialised, clear refusals."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from monai.networks.nets import resnet10
from torchvision.models import resnet18

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.errors import DataError
from medmeta.networks import Conv4, ResNet18
from medmeta.networks.initialise import initialise_backbone
from tests.conftest import module_for


def test_a_medmeta_checkpoint_gives_its_backbone_and_a_new_head(trained_checkpoint: Path) -> None:
    saved = torch.load(trained_checkpoint, weights_only=True)["state_dict"]  # a 3-way model, Conv4 of 8 channels
    torch.manual_seed(1)
    model = Conv4(in_channels=1, n_way=4, hidden_channels=8, image_size=16)
    fresh_head = model.head.weight.clone()
    done = initialise_backbone(model, trained_checkpoint)
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, saved[f"algorithm.model.{name}"]), name
    assert torch.equal(model.head.weight, fresh_head) and model.head.out_features == 4
    assert done.head == 2 and done.loaded == len(model.state_dict()) - 2

    levelled = Conv4(in_channels=1, n_way=4, hidden_channels=8, image_size=16, feature_levels="all")  # a wider head
    done = initialise_backbone(levelled, trained_checkpoint)
    assert done.loaded == len(levelled.state_dict()) - 2 and levelled.head.in_features == 3 * 2 * 8 + 8
    assert torch.equal(levelled.features[12].weight, saved["algorithm.model.features.12.weight"])


def test_torchvision_and_medicalnet_style_state_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = resnet18(weights=None)  # ImageNet-shaped: 3 channels, 1000 classes, running statistics
    torch.save(source.state_dict(), tmp_path / "torchvision.pt")
    model = ResNet18(in_channels=3, n_way=4, image_size=32)
    done = initialise_backbone(model, tmp_path / "torchvision.pt")
    assert torch.equal(model.features.conv1.weight, source.conv1.weight)
    assert torch.equal(model.features.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert done.head == 2 and done.statistics > 0  # fc re-initialised; torchvision's running statistics left out

    medicalnet = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)  # MedicalNet keeps DataParallel's "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in medicalnet.state_dict().items()}}, tmp_path / "medicalnet.pth")
    target = resnet10(spatial_dims=3, n_input_channels=1, num_classes=4)
    initialise_backbone(target, tmp_path / "medicalnet.pth")
    assert torch.equal(target.conv1.weight, medicalnet.conv1.weight) and target.fc.out_features == 4


def test_what_does_not_fit_is_listed(tmp_path: Path) -> None:
    model = Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=16)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    narrow = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=16).state_dict()
    torch.save(narrow, tmp_path / "narrow.pt")
    with pytest.raises(DataError, match=r"shape mismatches \(\d+\): features\.0\.weight \(4, 1, 3, 3\) in the file, \(8, 1, 3, 3\)"):
        initialise_backbone(model, tmp_path / "narrow.pt")
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("features.4.")}
    torch.save({**partial, "extra.weight": torch.zeros(2)}, tmp_path / "partial.pt")
    with pytest.raises(DataError, match=r"missing from the file \(2\): features\.4\.weight, features\.4\.bias; "
                                        r"unexpected in the file \(1\): extra\.weight"):
        initialise_backbone(model, tmp_path / "partial.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(DataError, match="not a readable weights file"):
        initialise_backbone(model, tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no such file"):
        initialise_backbone(model, tmp_path / "absent.pt")
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # nothing loaded


class _Encoded(torch.nn.Module):
    """A user's network whose names start like a wrapper (``encoder.``) and whose head is ``_fc`` (MONAI EfficientNet's)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8))
        self._fc = torch.nn.Linear(8, classes)


@pytest.mark.parametrize("classes", [4, 1000])  # the same head width as the file's, and ImageNet's
def test_exact_keys_come_first_and_the_head_is_found_on_the_model(tmp_path: Path, classes: int) -> None:
    torch.manual_seed(0)
    source = _Encoded(classes)
    torch.save(source.state_dict(), tmp_path / "own.pt")
    torch.manual_seed(1)
    target = _Encoded(4)
    fresh_head = target._fc.weight.clone()
    done = initialise_backbone(target, tmp_path / "own.pt")
    assert torch.equal(target.encoder[0].weight, source.encoder[0].weight)  # "encoder." kept, not stripped away
    assert torch.equal(target.encoder[2].weight, source.encoder[2].weight)  # a linear layer, but not the last
    assert torch.equal(target._fc.weight, fresh_head)  # the head is re-initialised, never taken from the file
    assert (done.loaded, done.head) == (4, 2)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wrapped.pt")
    assert initialise_backbone(_Encoded(4), tmp_path / "wrapped.pt").loaded == 4  # a wrapper prefix still comes off


class _FirstWeights(L.Callback):
    """The first conv's weights when training starts (after ``on_fit_start``)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = pl_module.model.features[0].weight.detach().clone()


def test_fit_starts_from_init_from_for_any_learner(tiny_dicom_root: Path, trained_checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(trained_checkpoint, weights_only=True)["state_dict"]["algorithm.model.features.0.weight"]
    module = module_for("protonet", n_way=3, image_size=16, hidden_channels=8, init_from=str(trained_checkpoint),
                        pixel_baseline=False)  # fmt: skip
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=1, q_query=2, meta_batch_size=2, image_size=16,
                              split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    first = _FirstWeights()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, inference_mode=False, default_root_dir=tmp_path, callbacks=[first])  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert torch.equal(first.weights, saved)
    assert module.hparams.init_from == str(trained_checkpoint)
