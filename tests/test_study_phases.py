"""Phase recognition from the images on phantom studies whose headers are silent or wrong.

The phantom writes honest headers (timing, agent, descriptions); each test rewrites them with
pydicom the way real archives damage them (de-identification strips the times, descriptions
are blank or name the wrong phase) and checks that every volume still gets its phase.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.phantom import generate_baseline, load_truth
from node.study.assembly import load_study_dir
from node.study.image_phase import ImageFeatures, phase_from_features
from node.study.model import Phase

PHASES = ("native", "arterial", "portal_venous", "delayed")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small four-phase phantom study (128 x 128, 5 mm)."""
    return generate_baseline(tmp_path_factory.mktemp("phases") / "study", 11, size=128,
                             n_lesions=2)


def _variant(src: Path, dst: Path, edit: Callable[[str, Dataset], None]) -> Path:
    """Copy the phantom's DICOM files to ``dst`` with ``edit(phase, dataset)`` applied."""
    shutil.copytree(src / "dicom", dst)
    for phase in PHASES:
        for path in sorted((dst / phase).glob("*.dcm")):
            ds = pydicom.dcmread(path)
            edit(phase, ds)
            ds.save_as(path, enforce_file_format=True)
    return dst


def _strip_timing(ds: Dataset) -> None:
    for keyword in ("ContrastBolusStartTime", "ContrastBolusStopTime", "AcquisitionTime",
                    "ContentTime", "SeriesTime"):
        if keyword in ds:
            delattr(ds, keyword)


def _assert_all_phases(study_dir: Path, truth: dict[str, Any]) -> dict[Phase, str]:
    study = load_study_dir(study_dir)
    got = {p.value: v.series_instance_uid for p, v in study.volumes.items()}
    evidence = {p: v.phase_evidence for p, v in study.volumes.items()}
    assert got == truth["series"], evidence
    return evidence


def test_blank_descriptions_and_no_timing(phantom: Path, tmp_path: Path) -> None:
    def edit(phase: str, ds: Dataset) -> None:
        _strip_timing(ds)
        ds.SeriesDescription = ""

    _assert_all_phases(_variant(phantom, tmp_path / "d", edit), load_truth(phantom))


def test_swapped_descriptions_images_win(phantom: Path, tmp_path: Path) -> None:
    swap = {"arterial": "ABD PORTAL VENOUS", "portal_venous": "ABD ARTERIAL",
            "native": "ABD DELAYED", "delayed": "ABD NATIVE"}

    def edit(phase: str, ds: Dataset) -> None:
        _strip_timing(ds)
        ds.SeriesDescription = swap[phase]

    evidence = _assert_all_phases(_variant(phantom, tmp_path / "d", edit), load_truth(phantom))
    for phase, text in evidence.items():
        assert "images win" in text, (phase, text)


def test_wrong_timing_and_no_agent_images_win(phantom: Path, tmp_path: Path) -> None:
    def edit(phase: str, ds: Dataset) -> None:
        # Every series claims to be 25 s after the bolus (arterial); the agent is emptied.
        ds.ContrastBolusStartTime, ds.AcquisitionTime = "100000", "100025"
        ds.SeriesDescription = "Abdomen 5.0 B30f"
        ds.ContrastBolusAgent = ""

    evidence = _assert_all_phases(_variant(phantom, tmp_path / "d", edit), load_truth(phantom))
    assert "images win" in evidence[Phase.PORTAL_VENOUS]


def test_honest_headers_agree_with_images(phantom: Path) -> None:
    evidence = _assert_all_phases(phantom / "dicom", load_truth(phantom))
    assert all("images win" not in text for text in evidence.values())
    assert all("images: aorta" in text for text in evidence.values())


@pytest.mark.parametrize(
    ("aorta", "liver", "vessel", "expected"),
    [
        (None, 55.0, 70.0, Phase.NATIVE),
        (45.0, 58.0, 70.0, Phase.NATIVE),
        (300.0, 70.0, 100.0, Phase.ARTERIAL),
        (180.0, 110.0, 180.0, Phase.PORTAL_VENOUS),
        (120.0, 100.0, 125.0, Phase.DELAYED),
        # moderate aorta but unlit portal vessels: an early (arterial) acquisition
        (160.0, 70.0, 75.0, Phase.ARTERIAL),
        (None, None, None, None),
        (250.0, None, None, None),
    ],
)
def test_feature_rules(aorta: float | None, liver: float | None, vessel: float | None,
                       expected: Phase | None) -> None:
    assert phase_from_features(ImageFeatures(aorta, liver, vessel))[0] is expected


@pytest.mark.parametrize(
    ("gaps", "phases", "expected"),
    [
        ((60.0, 25.0), ("portal_venous", "portal_venous"), ("portal_venous", "delayed")),
        ((45.0, 90.0), ("portal_venous", "portal_venous"), ("delayed", "portal_venous")),
        ((140.0, 75.0, 40.0), ("arterial", "portal_venous", "portal_venous"),
         ("arterial", "portal_venous", "delayed")),
        # same acquisition reconstructed twice: not distinct, left to the ranking
        ((150.0, 140.0), ("arterial", "arterial"), ("arterial", "arterial")),
        # no collision: nothing changes
        ((200.0, 20.0), ("arterial", "delayed"), ("arterial", "delayed")),
    ],
)
def test_study_context_orders_contrast_phases(gaps: tuple[float, ...], phases: tuple[str, ...],
                                              expected: tuple[str, ...]) -> None:
    from node.study.image_phase import resolve_in_study

    got = resolve_in_study(gaps, [Phase(p) for p in phases])
    assert [p.value for p in got] == list(expected)


def test_flipped_image_orientation_finds_the_liver(phantom: Path) -> None:
    """Rows/columns reversed (ImageOrientationPatient -1,0,0,0,-1,0): still the same phase."""
    from node.study.image_phase import measure_features
    from node.study.model import Geometry

    study = load_study_dir(phantom / "dicom")
    vol = study.volumes[Phase.PORTAL_VENOUS]
    g = vol.geometry
    flipped = Geometry(g.origin, (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), g.slice_normal,
                       g.spacing, g.shape)
    f = measure_features(np.ascontiguousarray(vol.array[:, ::-1, ::-1]), flipped)
    assert phase_from_features(f)[0] is Phase.PORTAL_VENOUS, f
