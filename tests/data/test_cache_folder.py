"""Where medmeta keeps generated data, and which generator makes the built-in data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta.data import synthetic, synthetic3d
from medmeta.data.cache_folder import default_cache_dir, ensure_synthetic, synthetic_root


def test_cache_folder_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDMETA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "medmeta"
    monkeypatch.setenv("MEDMETA_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert synthetic_root(4) == tmp_path / "mine" / "synthetic-lesions-v1-seed4"
    assert synthetic_root(4, spatial_dims=3) == tmp_path / "mine" / "synthetic-lesions-3d-v2-seed4"


@pytest.mark.parametrize("dims", [2, 3])
def test_the_built_in_data_set_is_generated_once_by_its_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dims: int
) -> None:
    monkeypatch.setenv("MEDMETA_CACHE", str(tmp_path))
    made: list[tuple[str, Path, int]] = []

    def fake(kind: str):
        def generate(target: Path, *, seed: int) -> Path:
            made.append((kind, target, seed))
            target.mkdir()
            return target

        return generate

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", fake("2d"))
    monkeypatch.setattr(synthetic3d, "generate_synthetic_volumes", fake("3d"))
    assert ensure_synthetic(7, dims) == synthetic_root(7, dims)
    assert ensure_synthetic(7, dims) == synthetic_root(7, dims)
    assert made == [(f"{dims}d", synthetic_root(7, dims), 7)]
