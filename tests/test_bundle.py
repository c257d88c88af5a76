"""``diagnose --save-adapted``: the adapted model as a MONAI bundle, loaded by medmeta and by MONAI, non-transductive."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out

from medmeta.adapted import FixedBatchNorm
from medmeta.bundle import load_bundle, network_definition, save_bundle
from medmeta.cli import main
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.loading import transform_images
from medmeta.diagnose import (
    _image_settings, adapted_algorithm, exported_network, load_checkpoint, read_queries, read_support,
)
from medmeta.errors import DataError
from medmeta.module import FewShotModule
from medmeta.networks.norm import EpisodeBatchNorm
from tests.conftest import module_for, spec
from tests.test_diagnose import _cases

# every learner that exports, with settings that make a wrong step, slot, rate or temperature show
LEARNERS = {
    "maml": {"inner_steps": 2},
    "anil": {"inner_steps": 1, "eval_inner_steps": 2},
    "meta_sgd": {"inner_steps": 1},
    "maml_pp": {"inner_steps": 2, "eval_inner_steps": 3},
    "proto_maml": {"inner_steps": 2},
    "protonet": {"distance": "cosine", "temperature": 0.1, "learn_temperature": True},
    "finetune": {"finetune_steps": 5, "pretrain_classes": 4, "finetune_scope": "last_block"},
    "logreg": {"pretrain_classes": 4, "max_iterations": 25},
    # every stage's features, the support flips, flip-averaged predictions (configs/real_data.yaml's adaptation)
    "finetune+levels+flips": {"finetune_steps": 5, "pretrain_classes": 4, "feature_levels": "all", "support_augment": True,
                              "query_augment": True},
    "maml+flips": {"inner_steps": 2, "support_augment": True, "query_augment": True},
    "maml+zero_head": {"inner_steps": 2, "zero_head": True},
    "maml+levels": {"inner_steps": 2, "feature_levels": "all"},  # a backbone giving every stage's features
    "anil+flips": {"inner_steps": 1, "eval_inner_steps": 2, "support_augment": True, "query_augment": True},
    "logreg+levels+flips": {"pretrain_classes": 4, "max_iterations": 25, "feature_levels": "all", "query_augment": True},
}
SETTINGS = {"image_size": 16, "window": None, "preset": None, "spatial_dims": 2, "in_channels": 1, "spacing": None, "roi_size": None}


def _probabilities(predictions: Path) -> tuple[list[str], torch.Tensor]:
    body = json.loads(predictions.read_text())
    return body["classes"], torch.tensor([[c["probabilities"][n] for n in body["classes"]] for c in body["cases"]])


def test_saved_bundle_gives_diagnoses_probabilities_through_medmeta_and_monai(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    """A transductive batch-norm MAML checkpoint adapted to 2 diagnoses, saved, loaded back both ways."""
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    bundle_dir = tmp_path / "adapted"
    assert main(["diagnose", "--ckpt", str(trained_checkpoint), "--support", str(support), "--query", str(queries),
                 "--out", str(tmp_path / "out"), "--save-adapted", str(bundle_dir)]) == 0  # fmt: skip
    names, reported = _probabilities(tmp_path / "out" / "predictions.json")
    bundle = load_bundle(bundle_dir)
    assert bundle.class_names == names and bundle.image_settings["image_size"] == 16
    records, _ = read_queries([queries], 2)
    query_x = transform_images(records, source="queries", **bundle.image_settings)
    with torch.no_grad():
        logits = bundle.network(query_x)
        alone = torch.cat([bundle.network(query_x[i : i + 1]) for i in range(len(query_x))])
    torch.testing.assert_close(logits.softmax(-1), reported, atol=1e-6, rtol=0.0)
    torch.testing.assert_close(alone.softmax(-1), reported, atol=1e-6, rtol=0.0)  # non-transductive
    assert sum(isinstance(m, FixedBatchNorm) for m in bundle.network.modules()) == 4  # Conv-4's batch norms, fixed

    parser = ConfigParser()  # MONAI's own route: the config's network_def, the weights with weights_only
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True))
    preprocessing = parser.get_parsed_content("preprocessing")  # the bundle's own transforms read a case as medmeta does
    images = torch.stack([preprocessing({"image": str(r.path)})["image"] for r in records])
    torch.testing.assert_close(images, query_x, atol=0.0, rtol=0.0)
    inferer, postprocessing = parser.get_parsed_content("inferer"), parser.get_parsed_content("postprocessing")
    with torch.no_grad():
        logits = inferer(images, network.eval())
    probabilities = torch.stack([postprocessing({"pred": row})["pred"] for row in logits])
    torch.testing.assert_close(probabilities, reported, atol=1e-6, rtol=0.0)
    verify_net_in_out(net_id="network_def", meta_file=str(bundle_dir / "configs" / "metadata.json"),
                      config_file=str(bundle_dir / "configs" / "inference.json"), device="cpu")  # fmt: skip

    text = "".join((bundle_dir / part).read_text() for part in ("configs/metadata.json", "configs/inference.json", "docs/README.md"))
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    assert str(tmp_path) not in text and trained_checkpoint.name not in text and "patient" not in text
    assert not [f.name for f in support.rglob("*.dcm") if f.name in text or f.stem in text]
    assert metadata["support_counts"] == {name: 3 for name in names}
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": names[0], "1": names[1]}
    assert "support set's batch statistics" in metadata["normalisation"] and metadata["norm_mode"] == "transductive"
    assert metadata["algorithm"] == "maml-second-order" and metadata["image_settings"]["window"] == [-1100.0, 400.0]
    assert "batch statistics at the adapted weights (non-transductive" in (tmp_path / "out" / "report.html").read_text()


def _perturbed(module: FewShotModule) -> FewShotModule:
    """Distinct running statistics per slot and perturbed learned rates, norm weights and temperature."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in module.model.modules():
            if isinstance(layer, EpisodeBatchNorm) and layer.steps > 0:
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
                layer.num_batches_tracked.fill_(1)
        for name, p in module.algorithm.named_parameters():
            if not name.startswith("model."):
                p.mul_(torch.rand(p.shape, generator=generator) + 0.5)
    return module.eval()


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_every_supported_learner_exports_its_own_adapted_model(learner: str, tmp_path: Path) -> None:
    """The export is the learner's own prediction wherever that is non-transductive, and fixed to the support set otherwise.

    Group norm and batch norm with running statistics: the exported logits are ``adapt_and_predict``'s on
    any queries. Transductive batch norm: the exported batch norm holds the support set's statistics, so
    on the support images themselves it gives ``adapt_and_predict``'s logits for those images as the query batch.
    """
    torch.manual_seed(0)
    support_x, support_y = torch.rand(6, 1, 16, 16), torch.tensor([0, 0, 0, 1, 1, 1])
    query_x = torch.rand(5, 1, 16, 16)
    for norm, norm_mode in (("group", "transductive"), ("batch", "running"), ("batch", "transductive")):
        module = _perturbed(module_for(learner.split("+")[0], n_way=2, image_size=16, hidden_channels=4, norm=norm, norm_mode=norm_mode,
                                       pixel_baseline=False, **LEARNERS[learner]))  # fmt: skip
        network = module.algorithm.adapted_network(support_x, support_y)
        queries = support_x if norm_mode == "transductive" and norm == "batch" else query_x
        expected = module.algorithm.adapt_and_predict(support_x[None], support_y[None], queries[None])[0]
        with torch.no_grad():
            got, alone = network(queries), torch.cat([network(x[None]) for x in query_x])
            batch = network(query_x)
        # transductive batch norm with flips: the export holds the statistics of the support set and its flips, which
        # no single query batch of adapt_and_predict has (a conv's output on a flipped image is not its output flipped)
        if not (norm_mode == "transductive" and norm == "batch" and learner.endswith("+flips")):
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=f"{learner}, {norm} norm, {norm_mode}")
        torch.testing.assert_close(alone.softmax(-1), batch.softmax(-1), atol=1e-6, rtol=0.0)  # non-transductive
    saved = save_bundle(tmp_path / "b", network, network_definition(network, module.hparams["backbone"], SETTINGS), ["a", "b"],
                        SETTINGS, {"algorithm": module.algorithm.label()})  # fmt: skip
    with torch.no_grad():
        assert torch.equal(load_bundle(saved).network(query_x), network(query_x))


def test_learners_without_the_export_hook_are_refused_clearly() -> None:
    """MANN and a user's learner without ``adapted_network``: one clear line, as diagnose reports it."""
    support_x, support_y = torch.rand(4, 1, 16, 16), torch.tensor([0, 0, 1, 1])
    for algorithm, label in (("mann", "mann"), ("tests.extending_example.CosineCentroids", "CosineCentroids")):
        module = module_for(algorithm, n_way=2, image_size=16, hidden_channels=4, pixel_baseline=False).eval()
        with pytest.raises(NotImplementedError, match=f"^{label} cannot export an adapted model$"):
            module.algorithm.adapted_network(support_x, support_y)
        with pytest.raises(DataError, match=f"--save-adapted: {label} cannot export an adapted model"):
            exported_network(module.algorithm, support_x, support_y, None, Path("model.ckpt"))


def _checkpoint(root: Path, folder: Path, algorithm: str, **learner: object) -> Path:
    """A 3-way Conv-4 (4 channels, 16x16) of ``algorithm`` trained for one step on the tiny DICOM set."""
    torch.manual_seed(0)
    module = FewShotModule(algorithm=spec(algorithm, **learner), backbone=spec("conv4", hidden_channels=4), n_way=3,
                           image_size=16, pixel_baseline=False)  # fmt: skip
    data = EpisodicDataModule(str(root), n_way=3, k_shot=1, q_query=1, meta_batch_size=1, image_size=16, val_episodes=1,
                              test_episodes=1, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        inference_mode=False, default_root_dir=folder, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


def test_diagnose_refuses_a_learner_without_the_hook_and_bad_bundle_folders(
    tiny_dicom_root: Path, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """Through the command: exit 2 with the reason, and neither --out nor --save-adapted written."""
    own = _checkpoint(tiny_dicom_root, tmp_path, "tests.extending_example.CosineCentroids")
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    capsys.readouterr()
    base = ["diagnose", "--support", str(support), "--query", str(queries), "--out", str(tmp_path / "out")]
    assert main([*base, "--ckpt", str(own), "--save-adapted", str(tmp_path / "b")]) == 2
    assert "--save-adapted: CosineCentroids cannot export an adapted model" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    for folder, reason in ((support / "b", "inside the input folder"), (tmp_path / "full", "not empty"),
                           (tmp_path / "out", "must be different folders")):  # fmt: skip
        assert main([*base, "--ckpt", str(trained_checkpoint), "--save-adapted", str(folder)]) == 2
        assert reason in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x.txt"] and not (support / "b").exists()


@pytest.mark.parametrize("adaptation", [{}, {"feature_levels": "all", "support_augment": True, "query_augment": True}],
                         ids=["plain", "levels+flips"])  # fmt: skip
def test_a_fine_tune_checkpoint_is_diagnosed_with_its_exported_model(
    tiny_dicom_root: Path, tmp_path: Path, adaptation: dict[str, object]
) -> None:  # fmt: skip
    """The fine-tune baseline offers no predictor: diagnose predicts and explains with its adapted_network.

    With flip-averaged predictions (configs/real_data.yaml) Grad-CAM taps the forward of the unflipped images.
    """
    ckpt = _checkpoint(tiny_dicom_root, tmp_path, "finetune", pretrain_classes=8, finetune_steps=10, **adaptation)
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    assert main(["diagnose", "--ckpt", str(ckpt), "--support", str(support), "--query", str(queries),
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    names, reported = _probabilities(tmp_path / "out" / "predictions.json")
    module, settings = load_checkpoint(ckpt)
    support_records, _ = read_support(support, 2)
    query_records, _ = read_queries([queries], 2)
    support_x = transform_images(support_records, source="support", **_image_settings(settings))
    support_y = torch.tensor([names.index(r.label) for r in support_records])
    network = adapted_algorithm(module, 2).adapted_network(support_x, support_y)
    with torch.no_grad():
        expected = network(transform_images(query_records, source="queries", **_image_settings(settings))).softmax(-1)
    torch.testing.assert_close(reported, expected, atol=1e-6, rtol=0.0)
    assert "the exported adapted model" in (tmp_path / "out" / "report.html").read_text()
    assert len(list((tmp_path / "out" / "overlays").glob("query-*.png"))) == len(query_records)  # every case explained


def test_load_bundle_names_the_folder_and_the_problem(tmp_path: Path) -> None:
    module = module_for("maml", n_way=2, image_size=16, hidden_channels=4, norm="group", inner_steps=1, pixel_baseline=False)
    network = module.eval().algorithm.adapted_network(torch.rand(4, 1, 16, 16), torch.tensor([0, 0, 1, 1]))
    network_def = network_definition(network, module.hparams["backbone"], SETTINGS)
    with pytest.raises(ValueError, match="looks like a path"):
        save_bundle(tmp_path / "p", network, network_def, ["a", "b"], SETTINGS, {"source": str(tmp_path / "case1.dcm")})
    assert not (tmp_path / "p").exists()
    folder = save_bundle(tmp_path / "b", network, network_def, ["a", "b"], SETTINGS, {})
    with pytest.raises(DataError, match="exists and is not an empty folder"):
        save_bundle(folder, network, network_def, ["a", "b"], SETTINGS, {})
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "os.system"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=f"bundle {folder}: medmeta builds only medmeta networks"):
        load_bundle(folder)
    (folder / "models" / "model.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="models/model.pt cannot be read"):
        config["network_def"]["_target_"] = "medmeta.adapted.AdaptedClassifier"
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        load_bundle(folder)
    with pytest.raises(DataError, match="missing configs/metadata.json"):
        (folder / "configs" / "metadata.json").unlink()
        load_bundle(folder)


def test_a_3d_export_round_trips_and_predicts_each_volume_alone(tmp_path: Path) -> None:
    module = module_for("maml", n_way=2, image_size=8, spatial_dims=3, hidden_channels=4, inner_steps=1, pixel_baseline=False)
    support_x, support_y = torch.rand(4, 1, 8, 8, 8), torch.tensor([0, 0, 1, 1])
    network = module.eval().algorithm.adapted_network(support_x, support_y)
    settings = {**SETTINGS, "image_size": 8, "spatial_dims": 3}
    folder = save_bundle(tmp_path / "b", network, network_definition(network, module.hparams["backbone"], settings), ["a", "b"],
                         settings, {})  # fmt: skip
    bundle, volumes = load_bundle(folder), torch.rand(3, 1, 8, 8, 8)
    with torch.no_grad():
        batch, alone = bundle.network(volumes), torch.cat([bundle.network(v[None]) for v in volumes])
    torch.testing.assert_close(alone.softmax(-1), batch.softmax(-1), atol=1e-6, rtol=0.0)
    assert bundle.image_settings["spatial_dims"] == 3
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [8, 8, 8]


def _saved(folder: Path, seed: int = 0) -> Path:
    """A 2-class group-norm MAML export saved as a bundle (a second seed: another network of the same shape)."""
    torch.manual_seed(seed)
    module = module_for("maml", n_way=2, image_size=16, hidden_channels=4, norm="group", inner_steps=1,
                        pixel_baseline=False)  # fmt: skip
    network = module.eval().algorithm.adapted_network(torch.rand(4, 1, 16, 16), torch.tensor([0, 0, 1, 1]))
    network_def = network_definition(network, module.hparams["backbone"], SETTINGS)
    settings = {**SETTINGS, "window": (-1100.0, 400.0)}
    return save_bundle(folder, network, network_def, ["benign", "malignant"], settings, {})


def _edit(folder: Path, relative: str, change) -> None:  # noqa: ANN001 - a function editing the parsed JSON in place
    path = folder / relative
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body, indent=2))


def _reversed_names(metadata: dict) -> None:
    """class_names and channel_def reversed together: consistent with each other, not with the weights."""
    names = metadata["class_names"] = metadata["class_names"][::-1]
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {str(k): name for k, name in enumerate(names)}


META, INFER = "configs/metadata.json", "configs/inference.json"
INTENSITY = "image_settings in configs/metadata.json have an invalid intensity setting"
CHANGED = r"was changed after the bundle was saved \(edited by hand\?\); save it again with diagnose --save-adapted$"


def _settings(**changes: object):  # noqa: ANN202 - an edit of metadata.json's image_settings
    return lambda metadata: metadata["image_settings"].update(**changes)


def _channel_def(metadata: dict) -> None:
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "x", "1": "y"}


HAND_EDITS = {  # edit -> (file, change, the refusal); every one loaded silently before the bundle recorded its hashes
    "class names reversed": (META, _reversed_names, f"class_names in {META} {CHANGED}"),
    "window": (META, _settings(window=[-200.0, 200.0]), f"image_settings in {META} {CHANGED}"),
    "query flips": (INFER, lambda c: c["network_def"]["head"].update(query_flips=True), f"network_def in {INFER} {CHANGED}"),
    "preprocessing": (INFER, lambda c: c["preprocessing"].update(window=[0.0, 80.0]), f"preprocessing in {INFER} {CHANGED}"),
    "duplicate class": (META, lambda m: m.update(class_names=["benign"] * 2), f"class_names in {META} name a class twice"),
    "channel_def": (META, _channel_def, f"{META}'s network_data_format channel_def .* disagrees with its class_names"),
    "window reversed": (META, _settings(window=[400.0, -1100.0]), INTENSITY),
    "window text": (META, _settings(window="soft tissue"), INTENSITY),
    "unknown preset": (META, _settings(preset="lung"), f"{INTENSITY} .*unknown intensity preset"),
}


@pytest.fixture(scope="module")
def saved_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("saved")
    return _saved(root / "a"), _saved(root / "b", seed=1)


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_a_hand_edited_bundle_is_refused_naming_what_changed(
    edit: str, saved_bundles: tuple[Path, Path], tmp_path: Path
) -> None:  # fmt: skip
    relative, change, message = HAND_EDITS[edit]
    folder = tmp_path / "bundle"
    shutil.copytree(saved_bundles[0], folder)
    _edit(folder, relative, change)
    with pytest.raises(DataError, match=f"^bundle {folder}: {message}") as refused:
        load_bundle(folder)
    assert "\n" not in str(refused.value)


def test_weights_of_another_bundle_are_refused_and_an_old_bundle_loads_with_one_warning(
    saved_bundles: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    ours, theirs = saved_bundles
    metadata = json.loads((ours / META).read_text())
    hashed = {"models/model.pt", "class_names", "image_settings", "network_def", "preprocessing"}
    assert set(metadata["saved_sha256"]) == hashed
    with caplog.at_level(logging.WARNING, logger="medmeta"):
        load_bundle(ours)
    assert caplog.text == ""  # a bundle with its hashes, unchanged: not a word
    folder = tmp_path / "mixed"
    shutil.copytree(ours, folder)
    shutil.copy(theirs / "models" / "model.pt", folder / "models" / "model.pt")  # same shapes: it would load
    with pytest.raises(DataError, match=f"^bundle {folder}: models/model.pt is not the file this bundle was saved with"):
        load_bundle(folder)
    old = tmp_path / "old"  # saved before the hashes were recorded: loads as before, with one warning
    shutil.copytree(ours, old)
    _edit(old, META, lambda m: m.pop("saved_sha256"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medmeta"):
        assert load_bundle(old).class_names == ["benign", "malignant"]
    assert len(caplog.records) == 1 and "edits to its weights or settings cannot be detected" in caplog.text
    _edit(old, META, lambda m: m["image_settings"].update(preset="lung"))  # still checked without the hashes
    with pytest.raises(DataError, match="invalid intensity setting"):
        load_bundle(old)
