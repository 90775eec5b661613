"""The SR reports how each phase was aligned and the residual misalignment (issue #4)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from node.analysis.results import PhaseAlignment
from node.dicom import codes
from node.dicom.seg import build_seg
from node.dicom.sr import build_sr
from tests.conftest import require_tool
from tests.dicom_fixtures import make_case


def _texts(ds: object, code: str) -> list[str]:
    out: list[str] = []

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodeValue == code and item.ValueType == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)  # type: ignore[attr-defined]
    return out


def test_sr_names_each_phase_alignment_and_residual(tmp_path: Path) -> None:
    study, result = make_case(n_lesions=1, with_response=False)
    result.alignments = [
        PhaseAlignment("arterial", "rigid", (1.7, 0.2, -4.5), (0.0, 0.5, -1.2), 0.34, 0.34),
        PhaseAlignment("delayed", "rigid+deformable", (0.0, 3.0, 0.0), residual_mm=0.8,
                       rigid_residual_mm=2.4, deformation_mm=4.2),
        PhaseAlignment("native", "failed"),
    ]
    seg = build_seg(study, result, input_key="align")
    sr = build_sr(study, result, seg, input_key="align", time_point="baseline")
    assert _texts(sr, codes.PHASE_ALIGNMENT.value) == [
        "arterial: rigid, shift 1.7/0.2/-4.5 mm, rotation 0.0/0.5/-1.2 deg, residual 0.3 mm",
        "delayed: rigid+deformable, shift 0.0/3.0/0.0 mm, rotation 0.0/0.0/0.0 deg, "
        "deformation up to 4.2 mm, residual 0.8 mm",
        "native: registration failed, phase not used",
    ]
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")] == []
