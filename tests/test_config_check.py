"""``medmeta.config_check``: config problems are named by file before Lightning parses anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta.config_check import check_config_files, config_paths
from medmeta.errors import DataError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_finds_both_spellings_of_config() -> None:
    assert config_paths(["fit", "--config", "a.yaml", "--config=b.yaml", "--model.n_way", "3"]) == ["a.yaml", "b.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes(config: Path) -> None:
    check_config_files(["fit", "--config", str(config)])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("modle:\n  n_way: 3\n", ["unknown key 'modle'", "did you mean 'model'"]),
        ("trainer:\n  max_step: 3\n", ["unknown key 'trainer.max_step'", "did you mean 'max_steps'"]),
        ("model:\n  meta_lr: [0.1\n", ["not valid YAML at line 3", "expected ',' or ']'"]),
        ("- model\n- data\n", ["expected keys such as 'model:'", "got a list"]),
    ],
)
def test_a_bad_config_is_named_with_the_reason(tmp_path: Path, text: str, words: list[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model:\n  backbone:\n    class_path: medmeta.networks.Conv4\n    init_args:\n      hidden_channels: 8\n")
    bad.write_text(text)
    with pytest.raises(DataError) as caught:
        check_config_files(["fit", "--config", str(good), "--config", str(bad)])
    message = str(caught.value)
    assert message.startswith(f"config {bad.resolve()}: ")
    for word in words:
        assert word in message


def test_missing_and_empty_configs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        check_config_files(["fit", f"--config={tmp_path / 'absent.yaml'}"])
    (tmp_path / "empty.yaml").write_text("")
    check_config_files(["fit", "--config", str(tmp_path / "empty.yaml")])


@pytest.mark.parametrize(
    ("text", "new"),
    [
        ("model:\n  inner_lr: 0.1\n", "model.algorithm.init_args.inner_lr"),
        ("model:\n  hidden_channels: 8\n", "model.backbone.init_args.hidden_channels"),
        ("model:\n  protonet_temperature: 0.1\n", "model.algorithm.init_args.temperature"),
        ("model:\n  mann_memory_slots: 16\n", "model.algorithm.init_args.memory_slots"),
    ],
)
def test_a_setting_in_its_old_place_in_a_config_names_the_new_spelling(tmp_path: Path, text: str, new: str) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(text)
    with pytest.raises(DataError) as caught:
        check_config_files(["fit", "--config", str(old)])
    message = str(caught.value)
    assert message.startswith(f"config {old.resolve()}: ") and new in message, message


@pytest.mark.parametrize(
    ("words", "new"),
    [
        (["--model.hidden_channels", "8"], "model.backbone.init_args.hidden_channels"),
        (["--model.inner_lr=0.1"], "model.algorithm.init_args.inner_lr"),
    ],
)
def test_a_setting_in_its_old_place_on_the_command_line_names_the_new_spelling(
    tmp_path: Path, words: list[str], new: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """Through ``medmeta fit`` itself: one line naming the new spelling, before any data is read."""
    from tests.test_cli import QUICKSTART, _medmeta_here

    with pytest.raises(DataError, match=new.replace(".", r"\.")):
        check_config_files(["fit", *words])
    status, printed = _medmeta_here("fit", "--config", str(QUICKSTART), "--data.root", str(tmp_path / "data"), *words,
                                    cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert f"'model.{words[0].removeprefix('--model.').split('=')[0]}'" in line and new in line, line


USER_PLUGINS = '''
from torch import nn
from medmeta.algorithms import MAML


class SlowMAML(MAML):
    def __init__(self, model, n_way, *, warmup_steps: int = 3, **kwargs):
        super().__init__(model, n_way, **kwargs)
        self.warmup_steps = warmup_steps


class Tiny(nn.Module):
    def __init__(self, in_channels: int = 1, n_way: int = 5, width: int = 4):
        super().__init__()
        self.head = nn.Linear(in_channels, n_way)
'''


def _plugin_config(kind: str, class_path: str, init_args: str) -> str:
    return f"model:\n  {kind}:\n    class_path: {class_path}\n    init_args:\n      {init_args}\n"


@pytest.mark.parametrize(
    ("kind", "class_path", "init_args", "key", "hint"),
    [
        ("algorithm", "medmeta.algorithms.MAML", "inner_lrr: 0.1", "inner_lrr", "inner_lr"),
        ("algorithm", "MANN", "mann_label_timing: previous", "mann_label_timing", "label_timing"),  # an old name
        ("backbone", "medmeta.networks.Conv4", "hidden_channel: 8", "hidden_channel", "hidden_channels"),
        ("algorithm", "user_plugins.SlowMAML", "warmup_step: 2", "warmup_step", "warmup_steps"),
        ("backbone", "user_plugins.Tiny", "widht: 8", "widht", "width"),
    ],
)
def test_a_misspelt_learner_or_backbone_setting_is_named_with_its_nearest_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, class_path: str, init_args: str, key: str, hint: str
) -> None:  # fmt: skip
    """``init_args`` keys are checked against the class's ``__init__``, shipped or the user's own."""
    (tmp_path / "user_plugins.py").write_text(USER_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text(_plugin_config(kind, class_path, init_args))
    with pytest.raises(DataError) as caught:
        check_config_files(["fit", "--config", str(bad)])
    assert str(caught.value) == (
        f"config {bad.resolve()}: unknown key 'model.{kind}.init_args.{key}' (did you mean '{hint}'?)"
    )
    right = init_args.replace(key, hint, 1)
    bad.write_text(_plugin_config(kind, class_path, right))
    check_config_files(["fit", "--config", str(bad)])
    if class_path.endswith("SlowMAML"):  # settings of the parent a user's learner passes **kwargs to are valid too
        bad.write_text(_plugin_config(kind, class_path, "inner_steps: 2"))
        check_config_files(["fit", "--config", str(bad)])


def test_a_backbones_shape_arguments_are_accepted_and_a_short_class_path_is_refused(tmp_path: Path) -> None:
    """The parser takes ``in_channels`` in a backbone's init_args (medmeta replaces it) but no short name as class_path."""
    config = tmp_path / "c.yaml"
    config.write_text(_plugin_config("backbone", "Conv4", "in_channels: 3"))
    check_config_files(["fit", "--config", str(config)])
    config.write_text(_plugin_config("algorithm", "maml", "inner_lr: 0.1"))
    with pytest.raises(DataError, match=r"maml is a command-line short name.*algorithm: MAML"):
        check_config_files(["fit", "--config", str(config)])


def test_fit_names_a_misspelt_learner_setting_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """``medmeta fit --config``: one line naming the file, the dotted key and its spelling, not the parser's usage."""
    from tests.test_cli import QUICKSTART, _medmeta_here

    typo = tmp_path / "typo.yaml"
    typo.write_text(_plugin_config("algorithm", "medmeta.algorithms.MAML", "inner_lrr: 0.1"))
    status, printed = _medmeta_here("fit", "--config", str(QUICKSTART), "--config", str(typo), "--data.root",
                                    str(tmp_path / "data"), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert str(typo.resolve()) in line and "'model.algorithm.init_args.inner_lrr'" in line and "'inner_lr'" in line
    assert "usage:" not in printed and not (tmp_path / "data").exists()
