"""The pipeline on disk, without the network: what reaches the archive for odd studies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from node import MANUFACTURER, pipeline
from node.archive.dicomweb import DicomWebArchive
from node.archive.orthanc import OrthancServer
from node.config import load_settings
from node.errors import StudyError
from node.phantom import generate_baseline
from node.service import make_study_handler
from node.study.model import Phase
from tests.conftest import require_tool


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


def _scout_only_study(phantom: Path, folder: Path) -> Path:
    """A study holding only a localizer: nothing the node can measure."""
    folder.mkdir(parents=True)
    src = sorted((phantom / "dicom" / "native").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(folder / "scout.dcm", enforce_file_format=True)
    return folder


def test_not_analysable_report_is_a_valid_sr(tmp_path: Path, phantom: Path) -> None:
    study = _scout_only_study(phantom, tmp_path / "scout")
    with pytest.raises(StudyError) as exc:
        pipeline.run(study, tmp_path / "out")
    path = pipeline.report_not_analysable(study, str(exc.value), tmp_path / "out")
    assert path is not None
    again = pipeline.report_not_analysable(study, str(exc.value), tmp_path / "out2")
    assert again is not None and again.name == path.name  # deterministic UIDs
    sr = pydicom.dcmread(path)
    source = pydicom.dcmread(study / "scout.dcm", stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    texts = [item.TextValue for item in sr.ContentSequence]
    assert any(t.startswith("Not analysable by liver-node: ") for t in texts)
    assert any("RESEARCH USE ONLY" in t for t in texts)
    dciodvfy = require_tool("dciodvfy")
    out = subprocess.run([str(dciodvfy), str(path)], capture_output=True, text=True)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln] == []


def test_empty_folder_gives_no_report(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert pipeline.report_not_analysable(tmp_path / "empty", "nothing", tmp_path / "o") is None


@pytest.mark.orthanc
def test_service_sends_the_report_to_the_archive(tmp_path: Path, phantom: Path,
                                                 orthanc: OrthancServer) -> None:
    study = _scout_only_study(phantom, tmp_path / "scout")
    settings = load_settings(None, {
        "spool_dir": str(tmp_path / "spool"), "report_unanalysable": True,
        "archive.ae_title": orthanc.aet, "archive.host": "127.0.0.1",
        "archive.port": orthanc.dicom_port, "archive.dicomweb_url": orthanc.dicomweb_url,
    })
    uid = str(pydicom.dcmread(study / "scout.dcm", stop_before_pixels=True).StudyInstanceUID)
    make_study_handler(settings)(uid, study)  # returns: a study, not the node, was at fault
    srs, _ = DicomWebArchive(orthanc.dicomweb_url).find_node_outputs(uid, MANUFACTURER)
    assert len(srs) == 1
    assert "Not analysable" in srs[0].ContentSequence[0].TextValue
