"""SEG and SR of a reference series with a missing slice (filled by interpolation at assembly).

The interpolated grid slice has no image of its own: assembly points it at the nearest source
image, so two grid slices share one dataset. The SEG must still put every frame on its source
image's plane (highdicom refuses duplicate planes) and pass dciodvfy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from node.analysis.results import AnalysisResult
from node.dicom.seg import build_seg, source_slices
from node.dicom.sr import build_sr
from node.study.model import Study
from node.study.stacking import stack_slices
from tests.conftest import require_tool
from tests.dicom_fixtures import make_case


def _with_missing_slice(missing: int = 3) -> tuple[Study, AnalysisResult]:
    study, result = make_case(n_lesions=2, with_response=False)
    ref = study.reference
    kept = [ds for k, ds in enumerate(ref.datasets) if k != missing]
    stack = stack_slices(kept)  # what assembly does: interpolate the gap on a regular grid
    assert len(stack.datasets) == len(ref.datasets)
    assert len({ds.SOPInstanceUID for ds in stack.datasets}) == len(kept)
    ref.datasets[:] = stack.datasets
    return study, result


def test_seg_of_an_interpolated_reference_skips_the_filled_slice(tmp_path: Path) -> None:
    study, result = _with_missing_slice(3)
    slices = source_slices(study)
    assert slices == [0, 1, 2, 4, 5, 6, 7]
    seg = build_seg(study, result, input_key="interp")
    ref = study.reference
    by_uid = {ds.SOPInstanceUID: ds for ds in ref.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        image = by_uid[source.ReferencedSOPInstanceUID]
        # every frame lies on the plane of the image it references
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in image.ImagePositionPatient])
    # the masks written are the grid's, slice for slice: the liver's frames are exactly the
    # kept slices that hold liver
    liver_number = len(result.lesions) + 1
    liver_frames = [f for f in seg.PerFrameFunctionalGroupsSequence
                    if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == liver_number]
    assert len(liver_frames) == sum(1 for k in slices if result.liver_mask[k].any())
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")] == []
    sr = build_sr(study, result, seg, input_key="interp", time_point="baseline")
    assert sr.SOPInstanceUID != seg.SOPInstanceUID


def test_seg_of_a_complete_reference_writes_every_slice() -> None:
    study, _ = make_case(n_lesions=1, with_response=False)
    assert source_slices(study) == list(range(len(study.reference.datasets)))


@pytest.mark.parametrize("missing", [1, 6])
def test_source_slices_keeps_one_slice_per_image(missing: int) -> None:
    study, _ = _with_missing_slice(missing)
    slices = source_slices(study)
    uids = [study.reference.datasets[k].SOPInstanceUID for k in slices]
    assert len(uids) == len(set(uids)) == 7
    assert missing not in slices
