"""Regenerate the example dumps beside this file from the synthetic test case.

    .venv/bin/python sr_templates/regenerate.py

Builds the follow-up SEG + SR of ``tests/dicom_fixtures.make_case`` (deterministic UIDs), then
writes ``example_followup_sr.dsrdump.txt`` (DCMTK ``dsrdump +Pc +Pt +Pl``) and
``example_followup_sr.dcmqi.json`` (dcmqi ``tid1500reader``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from node.dicom.seg import build_seg  # noqa: E402
from node.dicom.sr import build_sr  # noqa: E402
from tests.dicom_fixtures import make_case  # noqa: E402

INPUT_KEY = "example"


def main() -> int:
    study, result = make_case(n_lesions=2, with_response=True)
    seg = build_seg(study, result, input_key=INPUT_KEY)
    sr = build_sr(study, result, seg, input_key=INPUT_KEY, time_point="follow-up 1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sr.dcm"
        sr.save_as(path)
        dump = subprocess.run(["/usr/bin/dsrdump", "+Pc", "+Pt", "+Pl", str(path)],
                              check=True, capture_output=True, text=True).stdout
        (HERE / "example_followup_sr.dsrdump.txt").write_text(dump)
        reader = Path(sys.executable).parent / "tid1500reader"
        subprocess.run([str(reader), "--inputDICOM", str(path), "--outputMetadata",
                        str(HERE / "example_followup_sr.dcmqi.json")],
                       check=True, capture_output=True)
    print(f"wrote {HERE / 'example_followup_sr.dsrdump.txt'} and the dcmqi JSON")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
