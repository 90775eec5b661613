"""Shared test fixtures: real servers on free loopback ports, never mocks.

pydicom runs in strict validation mode for the whole session (house style): invalid values
raise on reading and writing instead of warning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.archive.orthanc import DICOMWEB_PLUGIN, ORTHANC_EXECUTABLE, OrthancServer
from node.archive.orthanc import free_port as _free_port

if TYPE_CHECKING:
    from node.ingest import NodeServer

INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools"

#: Tools called by absolute path: pynetdicom's console scripts in the venv shadow DCMTK's.
KNOWN_TOOLS: dict[str, Path] = {
    "Orthanc": ORTHANC_EXECUTABLE,
    "orthanc-dicomweb": DICOMWEB_PLUGIN,
    "storescu": Path("/usr/bin/storescu"),
    "echoscu": Path("/usr/bin/echoscu"),
    "findscu": Path("/usr/bin/findscu"),
    "storescp": Path("/usr/bin/storescp"),
    "dciodvfy": Path("/usr/bin/dciodvfy"),
    "dsrdump": Path("/usr/bin/dsrdump"),
    # dcmqi's readers come with the venv (pip package dcmqi)
    "segimage2itkimage": Path(sys.executable).parent / "segimage2itkimage",
    "tid1500reader": Path(sys.executable).parent / "tid1500reader",
}


def pytest_configure(config: pytest.Config) -> None:
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE


def require_tool(name: str) -> Path:
    """Path of an external tool; skip the test without it, or FAIL in CI (``CI=true``).

    Parameters
    ----------
    name:
        A key of :data:`KNOWN_TOOLS` (looked up by absolute path) or any program on PATH.
    """
    path = KNOWN_TOOLS.get(name)
    if path is None:
        found = shutil.which(name)
        path = Path(found) if found else None
    if path is not None and path.exists():
        return path
    message = f"{name} is not installed; install it with: {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a new free loopback port at each call."""
    return _free_port


NodeFactory = Callable[..., "NodeServer"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def process_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (read from /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def start_node(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[NodeFactory]:
    """Start real :class:`NodeServer` listeners on free ports; all are stopped afterwards.

    ``start_node(callback, **changes)``: ``callback(study_uid, study_dir)`` is the study
    callback; ``changes`` override the :class:`Settings` (spool in ``tmp_path / "spool"``).
    """
    from node.config import Settings
    from node.ingest import NodeServer

    started: list[NodeServer] = []

    def start(callback: Callable[[str, Path], None], **changes: object) -> NodeServer:
        settings = Settings(port=free_port(), spool_dir=tmp_path / "spool")
        node = NodeServer(replace(settings, **changes), callback)  # type: ignore[arg-type]
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def node_port() -> int:
    """The port the node listens on; the ``orthanc`` fixture routes to it."""
    return _free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator[OrthancServer]:
    """A real Orthanc with DICOMweb, StableAge 1 s, routing stable studies to ``node_port``."""
    require_tool("Orthanc")
    require_tool("orthanc-dicomweb")
    server = OrthancServer(tmp_path / "orthanc", node_port=node_port, stable_age=1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_ct_series(
    *,
    patient_id: str = "LN-TEST-1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str = "20240115",
    n: int = 3,
    size: int = 64,
    series_number: int = 1,
) -> list[Dataset]:
    """Small CT Image Storage datasets (PS3.3 A.3) of one series, in memory."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID = "Test^Liver", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime = study_date, "101500"
        ds.SeriesDate, ds.SeriesTime = study_date, "101600"
        ds.ContentDate, ds.ContentTime = study_date, "101600"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Modality, ds.Manufacturer = "CT", "TestCo"
        ds.SeriesNumber, ds.InstanceNumber = series_number, i + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ImagePositionPatient = [-100.0, -100.0, -5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [3.0, 3.0], 5.0
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        pixels = (np.arange(size * size, dtype=np.int16).reshape(size, size) + 7 * i) % 2000
        ds.PixelData = pixels.astype(np.int16).tobytes()
        out.append(ds)
    return out


def write_files(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write datasets as Part 10 files (``enforce_file_format=True``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(
    paths: list[Path], port: int, *, calling_aet: str = "SCANNER", called_aet: str = "LIVERNODE"
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK's storescu (the real one, by absolute path)."""
    exe = require_tool("storescu")
    return subprocess.run(
        [str(exe), "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
    )
