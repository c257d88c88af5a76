"""The cases ``medmeta predict`` reads from folders: images beside a series' slices are not silently dropped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from medmeta.data.cohort import find_cases
from medmeta.data.records import IN_SERIES_DETAIL


def test_an_image_inside_a_series_folder_is_left_out_with_a_warning_in_3d(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cohort = tmp_path / "cohort"
    (cohort / "patient1" / "ct").mkdir(parents=True)
    for k in range(3):
        (cohort / "patient1" / "ct" / f"IM{k:04d}.dcm").write_bytes(b"\0" * 200)  # found, not read
    (cohort / "patient1" / "ct" / "DOE_JOHN.nii.gz").write_bytes(b"\0" * 200)  # a file name may hold a patient's name
    (cohort / "patient2.nii.gz").write_bytes(b"\0" * 200)
    with caplog.at_level(logging.WARNING, logger="medmeta.data.cohort"):
        cases = find_cases([cohort], 3)
    assert [c.case_id for c in cases] == ["patient1/ct", "patient2.nii.gz"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"left out 1 image file(s) under {cohort}: {IN_SERIES_DETAIL}"]  # counted, never named
    caplog.clear()
    assert len(find_cases([cohort], 2)) == 5 and not caplog.records  # 2D: every file is a case
