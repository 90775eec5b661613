"""The whole path through real components.

DCMTK storescu (the scanner) -> real Orthanc -> Lua routing of the stable study -> the node
(``liver-node serve``, a real child process) -> analysis -> SEG + SR C-STOREd back to Orthanc
-> found by QIDO-RS and retrieved by WADO-RS (dicomweb-client) -> checked against the phantom's
ground truth, validated by dciodvfy and read by dcmqi.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from node import MANUFACTURER
from node.analysis.results import VolumetricResponse
from node.archive.orthanc import OrthancServer
from node.dicom.sr_reader import read_prior, read_response
from node.phantom import generate_baseline, generate_follow_up, load_truth
from tests.conftest import require_tool, storescu

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

LIVER_NODE = Path(sys.executable).parent / "liver-node"
#: A truth lesion counts as found when an SR lesion's centroid lies this close to its centre.
MATCH_MM = 15.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    # Lesions of 28-50 mm that shrink by a third after TACE stay >= ~20 mm, the size for which
    # the 10 % volume bar is set; smaller lesions are measured in benchmarks/.
    base = generate_baseline(root / "baseline", 21, size=256, n_lesions=3,
                             lesion_diameter_mm=(28.0, 50.0))
    follow = generate_follow_up(base, root / "follow-up", 22, tace=True, target_category="MR")
    return base, follow


@pytest.fixture
def node_process(tmp_path: Path, orthanc: OrthancServer, node_port: int) -> Iterator[Path]:
    """``liver-node serve`` as a child process, configured by a TOML file like a user would."""
    config = tmp_path / "node.toml"
    config.write_text(
        f'ae_title = "LIVERNODE"\nport = {node_port}\nspool_dir = "{tmp_path / "spool"}"\n'
        f'stable_seconds = 2\nallowed_calling_aets = ["ORTHANC", "SCANNER"]\n'
        f'[archive]\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\ndicomweb_url = "{orthanc.dicomweb_url}"\n'
    )
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen([str(LIVER_NODE), "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_echo(node_port, proc)
        yield tmp_path / "node.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_for_echo(port: int, proc: subprocess.Popen[bytes]) -> None:
    echoscu = require_tool("echoscu")
    for _ in range(100):
        if proc.poll() is not None:
            pytest.fail(f"liver-node serve exited with {proc.returncode}")
        if subprocess.run([str(echoscu), "-aet", "SCANNER", "-aec", "LIVERNODE", "127.0.0.1",
                           str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    pytest.fail("liver-node serve did not answer C-ECHO")


def _wait_for_outputs(client: DICOMwebClient, study_uid: str, log: Path,
                      timeout: float = 240.0) -> dict[str, dict]:
    """Poll QIDO-RS until the study holds a SEG and an SR series made by the node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for series in client.search_for_series(study_uid, fields=["Manufacturer"]):
            ds = pydicom.Dataset.from_json(series)
            if ds.get("Manufacturer") == MANUFACTURER and ds.Modality in ("SEG", "SR"):
                found[ds.Modality] = series
        if len(found) == 2:
            return found
        time.sleep(1.0)
    pytest.fail(f"no SEG + SR in {study_uid} after {timeout} s; node log:\n"
                f"{log.read_text()[-4000:]}")


def _retrieve(client: DICOMwebClient, study_uid: str, series: dict) -> pydicom.Dataset:
    series_uid = pydicom.Dataset.from_json(series).SeriesInstanceUID
    instances = client.retrieve_series(study_uid, series_uid)
    assert len(instances) == 1, "the node writes one SEG and one SR instance per analysis"
    return instances[0]


def _dciodvfy_errors(ds: pydicom.Dataset, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([str(require_tool("dciodvfy")), str(path)], capture_output=True,
                          text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def _send_and_collect(study: Path, orthanc: OrthancServer, client: DICOMwebClient, log: Path,
                      tmp_path: Path) -> tuple[dict, pydicom.Dataset, pydicom.Dataset]:
    truth = load_truth(study)
    files = sorted((study / "dicom").rglob("*.dcm"))
    sent = storescu(files, orthanc.dicom_port, calling_aet="SCANNER", called_aet=orthanc.aet)
    assert sent.returncode == 0, sent.stderr
    outputs = _wait_for_outputs(client, truth["study_instance_uid"], log)
    seg = _retrieve(client, truth["study_instance_uid"], outputs["SEG"])
    sr = _retrieve(client, truth["study_instance_uid"], outputs["SR"])
    for name, ds in (("seg", seg), ("sr", sr)):
        errors = _dciodvfy_errors(ds, tmp_path / f"{name}-{truth['study_date']}.dcm")
        assert errors == [], f"dciodvfy errors in the {name.upper()}: {errors}"
    return truth, seg, sr


def _assert_volumes(truth: dict, found: dict[str, object]) -> None:
    for les in truth["lesions"]:
        if les["status"] == "vanished":
            continue
        got = found[les["truth_id"]].volume_ml  # type: ignore[attr-defined]
        assert abs(got - les["volume_ml"]) <= 0.10 * les["volume_ml"], (
            f"{les['truth_id']}: node {got:.2f} ml vs truth {les['volume_ml']:.2f} ml")


def _match(truth: dict, seg: pydicom.Dataset, sr: pydicom.Dataset) -> dict[str, object]:
    """Truth lesion id -> the node's lesion whose centroid is nearest (within MATCH_MM)."""
    found = read_prior(sr, seg).lesions
    matched = {}
    for les in truth["lesions"]:
        if les["status"] == "vanished":
            continue
        dist = [np.linalg.norm(np.subtract(f.centroid_xyz, les["center_xyz"])) for f in found]
        assert dist, f"the node found no lesion; truth has {les['truth_id']}"
        best = int(np.argmin(dist))
        assert dist[best] <= MATCH_MM, (
            f"truth lesion {les['truth_id']} ({les['volume_ml']:.1f} ml) not found: nearest "
            f"node lesion {dist[best]:.1f} mm away")
        matched[les["truth_id"]] = found[best]
    return matched


def test_baseline_then_follow_up_through_orthanc(
    tmp_path: Path, orthanc: OrthancServer, node_process: Path, phantoms: tuple[Path, Path]
) -> None:
    require_tool("storescu")
    client = DICOMwebClient(orthanc.dicomweb_url)
    base_dir, follow_dir = phantoms

    base_truth, base_seg, base_sr = _send_and_collect(base_dir, orthanc, client, node_process,
                                                      tmp_path)
    base_found = _match(base_truth, base_seg, base_sr)
    _assert_volumes(base_truth, base_found)
    assert read_response(base_sr) is None, "a baseline has no prior: no response category"

    truth, seg, sr = _send_and_collect(follow_dir, orthanc, client, node_process, tmp_path)
    found = _match(truth, seg, sr)
    _assert_volumes(truth, found)
    for les in truth["lesions"]:
        if les["status"] == "present":
            # the same lesion keeps its Tracking UID across time points
            assert found[les["truth_id"]].tracking_uid == base_found[les["truth_id"]].tracking_uid
    assert len(read_prior(sr, seg).lesions) == sum(
        les["status"] != "vanished" for les in truth["lesions"]), "false-positive lesions"
    assert read_response(sr) == VolumetricResponse(truth["category"])
    assert sr.StudyInstanceUID == truth["study_instance_uid"]

    # dcmqi, an independent reader, reads both objects
    out = tmp_path / "dcmqi"
    out.mkdir()
    seg_path, sr_path = tmp_path / "seg-check.dcm", tmp_path / "sr-check.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    for cmd in ([str(require_tool("segimage2itkimage")), "--inputDICOM", str(seg_path),
                 "--outputDirectory", str(out)],
                [str(require_tool("tid1500reader")), "--inputDICOM", str(sr_path),
                 "--outputMetadata", str(out / "sr.json")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        assert proc.returncode == 0, proc.stderr
