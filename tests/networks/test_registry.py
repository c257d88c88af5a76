"""``medmeta.networks``: backbones by short name or class path, the shape arguments medmeta fills, the output check."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medmeta.module import FewShotModule
from medmeta.networks import SHAPE_ARGUMENTS, Conv4, ResNet12, backbone_spec, build_backbone, check_output

SHAPE = {"in_channels": 2, "n_way": 4, "spatial_dims": 2, "image_size": 16}
CLASSIFIER = "monai.networks.nets.Classifier"


def _classifier(classes: int = 3) -> dict[str, object]:
    """A small MONAI classifier for 1 x 8 x 8 images: only ``model(x) -> logits``, set up in ``init_args``."""
    return {"class_path": CLASSIFIER, "init_args": {"in_shape": [1, 8, 8], "classes": classes, "channels": [4, 8],
                                                   "strides": [2, 2], "num_res_units": 0}}  # fmt: skip


def test_build_backbone_fills_the_shape_arguments_from_the_data() -> None:
    model = build_backbone({"class_path": "conv4", "init_args": {"hidden_channels": 8}}, **SHAPE)
    assert isinstance(model, Conv4)
    assert model(torch.randn(3, 2, 16, 16)).shape == (3, 4)
    volumes = build_backbone("resnet12", in_channels=1, n_way=2, spatial_dims=3, image_size=8)
    assert isinstance(volumes, ResNet12) and volumes(torch.randn(2, 1, 8, 8, 8)).shape == (2, 2)
    assert "running_stat_steps" in SHAPE_ARGUMENTS
    running = build_backbone("conv4", **SHAPE, running_stat_steps=3)
    assert any(buffer.shape[0] == 3 for buffer in running.buffers())  # per-step running statistics
    spec = backbone_spec("conv4")
    assert spec["class_path"] == "medmeta.networks.conv4.Conv4" and not set(spec["init_args"]) & set(SHAPE_ARGUMENTS)


def test_shape_arguments_given_as_settings_are_replaced_by_the_data_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"backbone Conv4: n_way=7 is replaced by 4 from the data"):
        model = build_backbone({"class_path": "conv4", "init_args": {"n_way": 7}}, **SHAPE)
    assert model(torch.randn(1, 2, 16, 16)).shape == (1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parser fills in the defaults, or the data's own values: no warning
        build_backbone({"class_path": "conv4", "init_args": {"n_way": 5, "in_channels": 2}}, **SHAPE)


def test_a_monai_classifier_by_class_path_trains_one_maml_meta_step(tmp_path: Path) -> None:
    """MAML needs only ``model(x) -> logits``: a MONAI network with no ``features`` or ``head`` meta-trains."""
    torch.manual_seed(0)
    module = FewShotModule(algorithm={"class_path": "maml", "init_args": {"inner_lr": 0.1, "inner_steps": 1}},
                           backbone=_classifier(), n_way=3, image_size=8, pixel_baseline=False)  # fmt: skip
    assert type(module.model).__name__ == "Classifier"
    assert module.hparams["backbone"]["class_path"] == "monai.networks.nets.classifier.Classifier"
    g = torch.Generator().manual_seed(0)
    task = {"support_x": torch.randn(3, 1, 8, 8, generator=g), "support_y": torch.arange(3),
            "query_x": torch.randn(6, 1, 8, 8, generator=g), "query_y": torch.arange(3).repeat_interleave(2),
            "episode": torch.tensor(0)}  # fmt: skip
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader([task, task], batch_size=2))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    logits = module.algorithm.adapt_and_predict(*(task[k][None] for k in ("support_x", "support_y", "query_x")))
    assert logits.shape == (1, 6, 3)


def test_a_backbone_with_the_wrong_number_of_outputs_names_the_logits_needed() -> None:
    with pytest.raises(ValueError, match=r"gives \(2, 4\) for 2 images of shape \(1, 8, 8\); 3-way episodes need logits \[2, 3\]"):
        FewShotModule(backbone=_classifier(classes=4), n_way=3, image_size=8)
    with pytest.raises(ValueError, match=r"cannot process images of shape \(1, 16, 16\)"):
        FewShotModule(backbone=_classifier(), n_way=3, image_size=16)
    with pytest.raises(ValueError, match=r"gives tuple"):
        check_output(_TwoOutputs(), in_channels=1, n_way=3, spatial_dims=2, image_size=8)


class _TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_running_norm_mode_needs_a_backbone_with_per_step_statistics() -> None:
    with pytest.raises(ValueError, match=r"norm_mode='running' needs a backbone with medmeta's per-step batch norm "
                                         r"\(running_stat_steps\); Classifier has none: use norm_mode='transductive'"):
        FewShotModule(backbone=_classifier(), n_way=3, image_size=8, norm_mode="running")
