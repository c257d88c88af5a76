"""Plug-ins by class path: how a meta-learner or a backbone named in a config becomes a class and its settings.

A *spec* names a class and its settings, LightningCLI style::

    {"class_path": "my_package.MyLearner", "init_args": {"steps": 5}}

It may also be a short name from a registry, a class name or dotted path alone, the
class itself, or the ``functools.partial`` jsonargparse builds from a class path on the command
line. :func:`resolve` turns any of these into the class and its complete settings (defaults filled
in), checked against the class's signature; :func:`spec_of` writes them back as the plain mapping
that hyperparameters, checkpoints and configs store.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

PLAIN = (str, int, float, bool, type(None))


def class_path(cls: type) -> str:
    """The importable dotted path of ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_object(path: str, *, what: str) -> object:
    """The object at dotted ``path``; ``ValueError`` naming ``what`` it was to be when it cannot be imported."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{what} {path!r} cannot be imported ({error})") from None


def import_class(path: str, *, kind: str) -> type:
    """The class at dotted ``path``; ``ValueError`` naming ``kind`` when it cannot be imported."""
    value = import_object(path, what=f"{kind} class_path")
    if not isinstance(value, type):
        raise ValueError(f"{kind} class_path {path!r} is not an importable class")
    return value


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls(...)`` accepts: its ``__init__``'s, and through ``**kwargs`` its parents'.

    ``self``, ``*args`` and ``**kwargs`` themselves are left out; the first class in the MRO to
    name an argument gives its default.
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for param in params:
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                found.setdefault(param.name, param)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def resolve(
    spec: object,
    *,
    kind: str,
    short_names: Mapping[str, type],
    base: type,
    parameters: Callable[[type], Mapping[str, inspect.Parameter]],
) -> tuple[type, dict[str, Any]]:
    """The class of ``spec`` (a subclass of ``base``) and its settings with defaults filled in.

    ``parameters(cls)`` lists the settings a class accepts. Raises ``ValueError`` naming ``kind``
    for an unknown name, a class that is not a ``base``, or a setting the class does not take.
    """
    cls, given = _split(spec, kind=kind, short_names=short_names)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{kind} {class_path(cls) if isinstance(cls, type) else repr(cls)} is not a subclass of {class_path(base)}")
    accepted = parameters(cls)
    unknown = [name for name in given if name not in accepted]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{kind} {cls.__name__} has no setting {unknown[0]!r}{hint}; its settings: {', '.join(accepted) or 'none'}"
        )
    settings = {name: p.default for name, p in accepted.items() if p.default is not inspect.Parameter.empty}
    settings.update(given)
    missing = [name for name in accepted if name not in settings]
    if missing:
        raise ValueError(f"{kind} {cls.__name__} needs the setting(s) {', '.join(missing)} (init_args)")
    for name, value in settings.items():
        if not _plain(value):
            raise ValueError(
                f"{kind} {cls.__name__} setting {name}={value!r} is not a plain value (number, text, list or mapping), "
                "which configs and checkpoints can store"
            )
    return cls, settings


def spec_of(cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The plain mapping hyperparameters and configs store: ``{"class_path": ..., "init_args": {...}}``."""
    return {"class_path": class_path(cls), "init_args": dict(settings)}


def _split(spec: object, *, kind: str, short_names: Mapping[str, type]) -> tuple[type, dict[str, Any]]:
    """The class named by ``spec`` and the settings it gives explicitly."""
    if isinstance(spec, functools.partial):  # jsonargparse: partial(..., cls, **settings) for a class path
        classes = [arg for arg in (spec.func, *spec.args) if isinstance(arg, type)]
        if not classes:
            raise ValueError(f"{kind}: cannot tell the class of {spec!r}")
        return classes[-1], dict(spec.keywords)
    if isinstance(spec, type):
        return spec, {}
    if isinstance(spec, str):
        return resolve_name(spec, kind=kind, short_names=short_names), {}
    if isinstance(spec, Mapping):
        path = spec.get("class_path")
        if not isinstance(path, str):
            raise ValueError(
                f"{kind} settings {dict(spec)!r} name no class: give class_path (and init_args), e.g. "
                f"--model.{kind}.class_path NAME --model.{kind}.init_args.SETTING VALUE"
            )
        init_args = dict(spec.get("init_args") or {})
        init_args.update({k: v for k, v in spec.items() if k not in ("class_path", "init_args", "dict_kwargs")})
        return resolve_name(path, kind=kind, short_names=short_names), init_args
    raise ValueError(f"{kind} must be a name, a class path or a mapping with class_path; got {type(spec).__name__}")


def resolve_name(name: str, *, kind: str, short_names: Mapping[str, type]) -> type:
    """A short name, a shipped class's name, or a dotted class path."""
    if name in short_names:
        return short_names[name]
    by_class_name = {cls.__name__: cls for cls in short_names.values()}
    if name in by_class_name:
        return by_class_name[name]
    if "." in name:
        return import_class(name, kind=kind)
    choices = sorted({*short_names, *by_class_name})
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {kind} {name!r}{hint}; choose one of {', '.join(choices)} or give a class path")


def _plain(value: object) -> bool:
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
