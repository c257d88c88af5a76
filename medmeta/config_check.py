"""Check the ``--config`` files of a ``medmeta fit/validate/test/predict`` command before Lightning reads them.

Lightning's parser reports a misspelt key or a YAML syntax error without saying which of several
config files it came from; this check names the file, the key (with the nearest valid spelling)
or the line. It only refuses what the parser would refuse too: unknown keys are looked up in the
signatures of ``FewShotModule``, ``EpisodicDataModule`` and ``Trainer``, and the ``init_args`` keys
of ``model.algorithm`` and ``model.backbone`` in those of the class their ``class_path`` names
(an old learner setting's name hints at today's). A model setting in its place from before learners
and backbones were plug-ins is refused with its new spelling, and a learner's or backbone's short
name is turned into its class path on the command line (the parser knows class names and paths)
and refused, with the spelling to use, in a config file.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import yaml

from medmeta.algorithms import SHORT_NAMES as LEARNERS
from medmeta.algorithms import MetaLearner, legacy_setting_name
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.errors import DataError
from medmeta.module import FewShotModule
from medmeta.networks import LEGACY_MODULE_SETTINGS as BACKBONE_SETTINGS
from medmeta.networks import SHORT_NAMES as BACKBONES
from medmeta.plugins import class_path, init_parameters, resolve_name

TOP_LEVEL = (
    "seed_everything", "trainer", "model", "data", "test_after_fit", "episodes", "optimizer", "lr_scheduler",
    "ckpt_path", "weights_only",
)  # fmt: skip
SECTIONS: dict[str, Callable[..., object]] = {"model": FewShotModule, "data": EpisodicDataModule, "trainer": L.Trainer}


def config_paths(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config FILE`` or ``--config=FILE``, in order."""
    paths = []
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif word.startswith("--config="):
            paths.append(word.split("=", 1)[1])
    return paths


def legacy_spelling(name: str) -> str | None:
    """Today's spelling of a model setting that moved into the learner's or the backbone's settings, else ``None``."""
    if name in BACKBONE_SETTINGS:
        return f"model.backbone.init_args.{name}"
    new = legacy_setting_name(name)
    return f"model.algorithm.init_args.{new}" if new is not None else None


def _refuse_legacy(where: str, name: str) -> None:
    new = legacy_spelling(name)
    if new is not None:
        raise DataError(
            f"{where}: 'model.{name}' is the spelling of medmeta before learners and backbones were plug-ins; write {new} "
            "(with model.algorithm or model.backbone as class_path/init_args or a short name; see README)"
        )


PLUGINS = ("algorithm", "backbone")  # model settings that name a class


def _short_names(kind: str) -> dict[str, type]:
    return LEARNERS if kind == "algorithm" else BACKBONES


def expand_short_names(argv: Sequence[str]) -> list[str]:
    """``argv`` with a shipped learner's or backbone's short name (``--model.algorithm maml``) as its class path.

    The parser knows plug-ins by class name or path; the short names are medmeta's (its registries).
    A name that is none of these is refused here, with the names there are.
    """
    words = list(argv)
    for i, word in enumerate(words):
        for kind in PLUGINS:
            for flag in (f"--model.{kind}", f"--model.{kind}.class_path"):
                if word == flag and i + 1 < len(words):
                    words[i + 1] = _checked_name("command line", kind, words[i + 1])
                elif word.startswith(flag + "="):
                    words[i] = f"{flag}={_checked_name('command line', kind, word.split('=', 1)[1])}"
    return words


def _checked_name(where: str, kind: str, value: str) -> str:
    """``value`` as the parser should see it: a short name as its class path, a class name or path as it is."""
    try:
        cls = resolve_name(value, kind=kind, short_names=_short_names(kind))
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    return class_path(cls) if value in _short_names(kind) else value


def _refuse_short_name(where: str, kind: str, value: object) -> None:
    """A config file names plug-ins by class name or path (the parser reads the file, not medmeta)."""
    if not isinstance(value, str):
        return
    _checked_name(where, kind, value)
    if value in _short_names(kind):
        cls = _short_names(kind)[value]
        raise DataError(
            f"{where}: model.{kind}: {value} is a command-line short name; in a config write "
            f"'{kind}: {cls.__name__}' or '{kind}: {{class_path: {class_path(cls)}}}' (with init_args for its settings)"
        )


def check_config_files(argv: Sequence[str]) -> None:
    """Raise ``DataError`` naming the file for a missing config, invalid YAML or an unknown key.

    A model setting in its old place (``model.inner_lr``, on the command line too) is refused with
    its new spelling.
    """
    for word in argv:
        if word.startswith("--model."):
            _refuse_legacy("command line", word.removeprefix("--model.").split("=", 1)[0])
    for given in config_paths(argv):
        path = Path(given).expanduser()
        shown = path.resolve()
        if not path.is_file():
            raise DataError(f"config {shown}: no such file")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise DataError(f"config {shown}: not valid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"config {shown}: cannot be read ({error})") from None
        if content is None:
            continue
        if not isinstance(content, dict):
            raise DataError(f"config {shown}: expected keys such as 'model:' and 'data:', got a {type(content).__name__}")
        for key, value in content.items():
            _check_key(shown, str(key), TOP_LEVEL)
            if key in SECTIONS and isinstance(value, dict):
                allowed = [p for p in inspect.signature(SECTIONS[key]).parameters if p not in ("self", "args", "kwargs")]
                for name in value:
                    if key == "model":
                        _refuse_legacy(f"config {shown}", str(name))
                        if name in PLUGINS:
                            _refuse_short_name(f"config {shown}", str(name), value[name])
                            _check_init_args(shown, str(name), value[name])
                    _check_key(shown, f"{key}.{name}", allowed)


def _plugin_settings(kind: str, cls: type) -> list[str] | None:
    """The ``init_args`` keys the parser accepts for a learner or backbone class; ``None`` when medmeta cannot tell."""
    if kind == "algorithm":
        return list(cls.settings()) if issubclass(cls, MetaLearner) else None
    return list(init_parameters(cls))  # a backbone's shape arguments too: medmeta replaces them from the data


def _check_init_args(path: Path, kind: str, value: object) -> None:
    """Check the ``init_args`` keys of ``model.<kind>`` given as ``{class_path, init_args}`` against the class."""
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        return  # a name alone has no settings; init_args without class_path may belong to another file's class
    _refuse_short_name(f"config {path}", kind, value["class_path"])
    init_args = value.get("init_args")
    if not isinstance(init_args, dict):
        return
    allowed = _plugin_settings(kind, resolve_name(value["class_path"], kind=kind, short_names=_short_names(kind)))
    if allowed is None:
        return
    for name in init_args:
        renamed = legacy_setting_name(str(name)) if kind == "algorithm" else None
        _check_key(path, f"model.{kind}.init_args.{name}", allowed, renamed if renamed in allowed else None)


def _check_key(path: Path, dotted: str, allowed: Sequence[str], suggestion: str | None = None) -> None:
    name = dotted.rsplit(".", 1)[-1]
    if name in allowed:
        return
    close = [suggestion] if suggestion else difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"config {path}: unknown key '{dotted}'{hint}")
