"""Study assembly and phase recognition on real CT: TCIA HCC-TACE-Seg, patient HCC_007.

Two time points; per study a 10 mm native series and ONE series holding two acquisitions
(arterial: files ``1-*``, portal venous: files ``2-*``). Timing tags are removed and the series
descriptions do not name the phase, so the phases must come from the images. The follow-up's
arterial acquisition even shares AcquisitionNumber 1 with the native series.

The data live outside the repository at ``../shared/data`` (relative to the project root).
Without them the tests skip, except in CI (``CI=true``) where missing data is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.study.assembly import load_study_dir
from node.study.model import Phase, Study

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PATIENT_DIR = DATA_ROOT / "HCC-TACE-Seg" / "HCC_007"
HOW_TO_GET = (
    f"real data not found at {PATIENT_DIR}: download patient HCC_007 of the TCIA collection "
    "HCC-TACE-Seg (doi:10.7937/TCIA.5FNA-0924, e.g. with the NBIA Data Retriever) and put "
    "its folder, in TCIA's layout, into ../shared/data/HCC-TACE-Seg/ next to the project"
)

#: study folder prefix -> {phase: (series folder prefix, file prefix, slices)}
EXPECTED: dict[str, dict[Phase, tuple[str, str, int]]] = {
    "12-27-1997": {
        Phase.NATIVE: ("2.000000-PRE LIVER", "1-", 18),
        Phase.ARTERIAL: ("4.000000-Recon 2 LIVER 3 PHASE AP", "1-", 75),
        Phase.PORTAL_VENOUS: ("4.000000-Recon 2 LIVER 3 PHASE AP", "2-", 75),
    },
    "03-14-1998": {
        Phase.NATIVE: ("2.000000-PRE LIVER", "1-", 20),
        Phase.ARTERIAL: ("4.000000-Recon 2 3 PHASE LIVER ABD", "1-", 79),
        Phase.PORTAL_VENOUS: ("4.000000-Recon 2 3 PHASE LIVER ABD", "2-", 115),
    },
}


def _study_dir(prefix: str) -> Path:
    if not PATIENT_DIR.is_dir():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI: {HOW_TO_GET}")
        pytest.skip(HOW_TO_GET)
    found = [d for d in PATIENT_DIR.iterdir() if d.is_dir() and d.name.startswith(prefix)]
    assert len(found) == 1, f"expected one study folder {prefix}* in {PATIENT_DIR}"
    return found[0]


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def real_study(request: pytest.FixtureRequest) -> tuple[str, Study]:
    """One assembled HCC_007 study (module scope: each is assembled once)."""
    prefix = str(request.param)
    return prefix, load_study_dir(_study_dir(prefix))


def test_every_volume_gets_its_phase_from_the_images(real_study: tuple[str, Study]) -> None:
    prefix, study = real_study
    expected = EXPECTED[prefix]
    assert set(study.volumes) == set(expected), {
        p.value: v.phase_evidence for p, v in study.volumes.items()}
    for phase, (series_prefix, file_prefix, slices) in expected.items():
        vol = study.volumes[phase]
        files = {Path(str(ds.filename)) for ds in vol.datasets}
        assert all(f.parent.name.startswith(series_prefix) for f in files), phase
        assert all(f.name.startswith(file_prefix) for f in files), phase
        assert len(vol.datasets) == slices == vol.array.shape[0]
        assert "images: aorta" in vol.phase_evidence, vol.phase_evidence
        if phase is not Phase.NATIVE:
            # ContrastBolusAgent is present but empty: the header hint "no agent" is overruled.
            assert "images win" in vol.phase_evidence, vol.phase_evidence


def test_geometry_and_identity(real_study: tuple[str, Study]) -> None:
    _, study = real_study
    assert study.patient_id == "HCC_007"
    native = study.volumes[Phase.NATIVE].geometry
    pv = study.volumes[Phase.PORTAL_VENOUS].geometry
    assert native.spacing[0] == pytest.approx(10.0, abs=0.05)
    assert pv.spacing[0] == pytest.approx(2.5, abs=0.05)
    assert pv.spacing[1:] == pytest.approx((0.703125, 0.703125))
    # Two acquisitions in one series: same series UID, two volumes.
    art = study.volumes[Phase.ARTERIAL]
    assert art.series_instance_uid == study.volumes[Phase.PORTAL_VENOUS].series_instance_uid
    assert study.reference is study.volumes[Phase.PORTAL_VENOUS]


def test_thick_native_goes_onto_the_thin_reference_grid(real_study: tuple[str, Study]) -> None:
    from node.analysis.register import align_to_reference

    _, study = real_study
    native, ref = study.volumes[Phase.NATIVE], study.reference
    al = align_to_reference(native.array, native.geometry, ref.array, ref.geometry,
                            estimate_shift=False)
    assert al.array.shape == ref.array.shape
    # Inside the native coverage the resampled values are CT values, not the padding.
    inside = al.array[al.array > -1000.0]
    assert inside.size > 0.2 * al.array.size


def test_missing_data_skips_with_instructions_or_fails_in_ci(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tests.test_real_data_study as me

    monkeypatch.setattr(me, "PATIENT_DIR", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="HCC-TACE-Seg"):
        me._study_dir("12-27-1997")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: real data not found"):
        me._study_dir("12-27-1997")
