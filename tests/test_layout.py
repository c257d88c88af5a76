"""The shape of the package (issue 15): one file per idea, small modules, no learner or backbone named outside its place."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import medmeta
from medmeta.algorithms import SHORT_NAMES as LEARNERS
from medmeta.networks import SHORT_NAMES as BACKBONES

PACKAGE = Path(medmeta.__file__).parent
REGISTRIES = {PACKAGE / "algorithms" / "__init__.py", PACKAGE / "networks" / "__init__.py"}
LONG_MODULE_LINES = 300
LONG_REASON = "Why this module is longer than 300 lines:"


def _sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def _names_of(cls: type, short: str) -> list[re.Pattern[str]]:
    """How a file would name a learner or backbone: its class name, or its short name as a string or in backticks."""
    quoted = "|".join(re.escape(q + short + q) for q in ('"', "'", "``"))
    return [re.compile(rf"\b{re.escape(cls.__name__)}\b"), re.compile(quoted)]


def test_no_learner_or_backbone_is_named_outside_its_own_file_and_the_registry() -> None:
    """Adding a learner or a backbone is its own file plus a registry line: no other module names one."""
    offences = []
    for short, cls in [*LEARNERS.items(), *BACKBONES.items()]:
        allowed = REGISTRIES | {Path(inspect.getfile(cls))}
        # a subclass's file names the class it extends
        allowed |= {Path(inspect.getfile(sub)) for sub in [*LEARNERS.values(), *BACKBONES.values()] if cls in sub.__mro__[1:]}
        for path, text in _sources().items():
            if path in allowed:
                continue
            for pattern in _names_of(cls, short):
                for match in pattern.finditer(text):
                    line = text.count("\n", 0, match.start()) + 1
                    offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} names {cls.__name__} ({match.group()})")
    assert not offences, "\n".join(offences)


def test_every_long_module_says_why_at_its_top() -> None:
    """No module over about 300 lines without a reason written in its docstring."""
    unexplained = []
    for path, text in _sources().items():
        lines = text.count("\n") + 1
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > LONG_MODULE_LINES and LONG_REASON not in docstring:
            unexplained.append(f"{path.relative_to(PACKAGE.parent)} ({lines} lines)")
    assert not unexplained, f"modules over {LONG_MODULE_LINES} lines without '{LONG_REASON}' in their docstring: {unexplained}"


def test_the_layout_test_can_fail(tmp_path: Path) -> None:
    """The name patterns find a learner named in another module (so the layout test is not vacuous)."""
    cls = LEARNERS[next(iter(LEARNERS))]
    text = f'def choose(name):\n    return name == "{cls.name}" or isinstance(name, {cls.__name__})\n'
    found = [p.pattern for p in _names_of(cls, cls.name) if p.search(text)]
    assert len(found) == 2
