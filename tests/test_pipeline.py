"""The pipeline on disk, without the network: what reaches the archive for odd studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from node import pipeline
from node.errors import StudyError
from node.phantom import generate_baseline
from node.study.model import Phase


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_baseline(tmp_path_factory.mktemp("ph") / "study", 31, size=256, n_lesions=2,
                             lesion_diameter_mm=(25.0, 40.0))


def test_a_folder_without_ct_is_not_analysable(tmp_path: Path, phantom: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError):
        pipeline.run(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_portal_venous_only_study_still_gets_volumetry(tmp_path: Path, phantom: Path) -> None:
    study = tmp_path / "pv-only"
    shutil.copytree(phantom / "dicom" / "portal_venous", study)
    outcome = pipeline.run(study, tmp_path / "out")
    assert list(outcome.study.volumes) == [Phase.PORTAL_VENOUS]
    assert 800 < outcome.result.liver_volume_ml < 2500
    seg = pydicom.dcmread(outcome.seg_path)
    sr = pydicom.dcmread(outcome.sr_path)
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert sr.StudyInstanceUID == outcome.study.study_instance_uid


def test_outputs_are_deterministic(tmp_path: Path, phantom: Path) -> None:
    first = pipeline.run(phantom / "dicom", tmp_path / "a")
    second = pipeline.run(phantom / "dicom", tmp_path / "b")
    assert first.seg_path.name == second.seg_path.name
    assert first.sr_path.name == second.sr_path.name
    assert len(first.result.lesions) == 2
