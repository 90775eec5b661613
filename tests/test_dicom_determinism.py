"""The same inputs give the same objects: every UID in the SEG and the SR is derived."""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.dicom.seg import build_seg
from node.dicom.sr import build_sr
from tests.dicom_fixtures import make_case


def _uids(ds: Dataset) -> list[tuple[str, str]]:
    """(tag path, value) of every UI element, recursively, in order."""
    out: list[tuple[str, str]] = []

    def walk(d: Dataset, path: str) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for n, item in enumerate(elem.value):
                    walk(item, f"{path}/{elem.keyword}[{n}]")
            elif elem.VR == "UI" and elem.value:
                out.append((f"{path}/{elem.keyword}", str(elem.value)))

    walk(ds, "")
    return out


def test_seg_and_sr_uids_are_the_same_on_every_run() -> None:
    runs = []
    for _ in range(2):
        study, result = make_case(n_lesions=2, with_response=True)
        seg = build_seg(study, result, input_key="determinism")
        sr = build_sr(study, result, seg, input_key="determinism", time_point="follow-up 1")
        runs.append((_uids(seg), _uids(sr)))
    (seg1, sr1), (seg2, sr2) = runs
    assert any(k.endswith("DimensionOrganizationUID") for k, _ in seg1)
    assert seg1 == seg2
    assert sr1 == sr2
