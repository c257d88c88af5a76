"""``medmeta.plugins``: a spec (short name, class name, dotted path, class, mapping, partial) to a class and its settings."""

from __future__ import annotations

import functools
import inspect

import pytest

from medmeta.plugins import class_path, import_class, resolve, spec_of


class Base:
    """Stands in for ``MetaLearner`` or ``nn.Module``."""


class Widget(Base):
    def __init__(self, *, width: int = 4, colour: str = "red") -> None:
        self.width, self.colour = width, colour


class NeedsSize(Base):
    def __init__(self, size: int) -> None:
        self.size = size


class Stranger:  # not a Base
    pass


SHORT = {"widget": Widget, "sized": NeedsSize}
PATH = f"{__name__}.Widget"


def _resolve(spec: object) -> tuple[type, dict[str, object]]:
    return resolve(spec, kind="gadget", short_names=SHORT, base=Base, parameters=_settings)


def _settings(cls: type) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


@pytest.mark.parametrize(
    "spec",
    [
        "widget",  # short name
        "Widget",  # class name of a registered class
        PATH,  # dotted class path
        Widget,  # the class
        {"class_path": "widget"},
        {"class_path": PATH, "init_args": {}},
        functools.partial(Widget),  # what jsonargparse builds for a class path
    ],
    ids=["short", "class-name", "dotted", "class", "mapping", "mapping-path", "partial"],
)
def test_every_spelling_resolves_to_the_class_with_its_defaults(spec: object) -> None:
    assert _resolve(spec) == (Widget, {"width": 4, "colour": "red"})


def test_settings_come_from_init_args_a_flat_mapping_or_the_partial() -> None:
    expected = (Widget, {"width": 8, "colour": "red"})
    assert _resolve({"class_path": "widget", "init_args": {"width": 8}}) == expected
    assert _resolve({"class_path": "widget", "width": 8}) == expected  # jsonargparse's dict[str, Any] keeps them flat
    assert _resolve({"class_path": "widget", "init_args": {"width": 2}, "width": 8}) == expected  # the later one wins
    assert _resolve(functools.partial(Widget, width=8)) == expected
    assert _resolve({"class_path": "sized", "init_args": {"size": 3}}) == (NeedsSize, {"size": 3})


def test_an_unknown_setting_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match=r"gadget Widget has no setting 'widht' \(did you mean 'width'\?\); its settings: width, colour"):
        _resolve({"class_path": "widget", "init_args": {"widht": 8}})


def test_an_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError) as caught:
        _resolve("widgte")
    message = str(caught.value)
    assert "unknown gadget 'widgte'" in message and "did you mean 'widget'" in message
    assert "choose one of NeedsSize, Widget, sized, widget or give a class path" in message


def test_a_mapping_without_class_path_says_how_to_name_the_class() -> None:
    with pytest.raises(ValueError, match=r"name no class: give class_path \(and init_args\), e\.g\. --model\.gadget\.class_path"):
        _resolve({"init_args": {"width": 8}})
    with pytest.raises(ValueError, match="must be a name, a class path or a mapping"):
        _resolve(3)


def test_a_setting_that_is_not_a_plain_value_is_refused() -> None:
    """Hyperparameters, checkpoints (loaded weights_only) and configs can store only plain values."""
    with pytest.raises(ValueError, match=r"setting colour=<object object at .*> is not a plain value"):
        _resolve({"class_path": "widget", "init_args": {"colour": object()}})
    assert _resolve({"class_path": "widget", "init_args": {"colour": ["red", {"alpha": 0.5}]}})[1]["colour"]


def test_wrong_classes_and_missing_settings_are_named() -> None:
    with pytest.raises(ValueError, match=rf"gadget {__name__}\.Stranger is not a subclass of {__name__}\.Base"):
        _resolve(f"{__name__}.Stranger")
    with pytest.raises(ValueError, match="gadget NeedsSize needs the setting"):
        _resolve("sized")
    with pytest.raises(ValueError, match=r"gadget class_path 'no_such_package\.Thing' cannot be imported"):
        _resolve("no_such_package.Thing")
    with pytest.raises(ValueError, match="is not an importable class"):
        import_class(f"{__name__}.SHORT", kind="gadget")


def test_spec_of_writes_the_plain_mapping_back() -> None:
    cls, settings = _resolve({"class_path": "widget", "init_args": {"width": 8}})
    spec = spec_of(cls, settings)
    assert spec == {"class_path": PATH, "init_args": {"width": 8, "colour": "red"}} and class_path(Widget) == PATH
    assert _resolve(spec) == (cls, settings)  # round trip


def test_the_registries_use_it() -> None:
    """Learners and backbones resolve through the same rules, by their short names and class names."""
    from medmeta.algorithms import MAMLPlusPlus, ProtoNet, resolve_algorithm
    from medmeta.networks import ResNet12, resolve_backbone

    assert resolve_algorithm("maml_pp")[0] is MAMLPlusPlus
    assert resolve_algorithm({"class_path": "ProtoNet", "init_args": {"temperature": 0.1}})[1]["temperature"] == 0.1
    assert resolve_algorithm(ProtoNet)[1] == {"distance": "squared_euclidean", "temperature": 1.0, "learn_temperature": False, "support_augment": False}
    cls, settings = resolve_backbone({"class_path": "resnet12", "init_args": {"hidden_channels": 8}})
    assert cls is ResNet12 and settings["hidden_channels"] == 8 and "in_channels" not in settings  # shape: from the data
    with pytest.raises(ValueError, match="did you mean 'inner_lr'"):
        resolve_algorithm({"class_path": "maml", "init_args": {"iner_lr": 0.1}})
