"""Every accepted transfer syntax, sent for real, stored as received and decoded back.

Compressed files are made by DCMTK's own encoders (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) or,
for JPEG 2000 which DCMTK 3.6.7 cannot encode, by pydicom with the pylibjpeg-openjpeg plugin;
DCMTK's storescu sends them; the spool's copy must decode (pylibjpeg plugins) to the same
voxels as what was sent (lossless: the original voxels).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComprehensiveSRStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from node.config import Settings
from node.ingest import NodeServer
from tests.conftest import make_ct_series, require_tool, storescu, write_files

#: name -> (DCMTK tool and options or "pydicom", transfer syntax, lossless, 8-bit source)
CASES: dict[str, tuple[list[str], str, bool, bool]] = {
    "implicit-le": (["dcmconv", "+ti"], "1.2.840.10008.1.2", True, False),
    "explicit-le": (["dcmconv", "+te"], "1.2.840.10008.1.2.1", True, False),
    "deflated": (["dcmconv", "+td"], "1.2.840.10008.1.2.1.99", True, False),
    "explicit-be": (["dcmconv", "+tb"], "1.2.840.10008.1.2.2", True, False),
    "rle": (["dcmcrle"], "1.2.840.10008.1.2.5", True, False),
    "jpeg-baseline": (["dcmcjpeg", "+eb", "+un"], "1.2.840.10008.1.2.4.50", False, True),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True, False),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80", True, False),
    "jpeg-ls-near": (["dcmcjpls", "+en", "+un"], "1.2.840.10008.1.2.4.81", False, True),
    "j2k-lossless": (["pydicom"], JPEG2000Lossless, True, False),
    "j2k-lossy": (["pydicom"], JPEG2000, False, False),
}

#: storescu proposes uncompressed data in the syntax it prefers: ask for the one under test.
PROPOSE = {"implicit-le": ["-xi"], "explicit-le": ["-xe"], "deflated": ["-xd"],
           "explicit-be": ["-xb"], "rle": ["-xr"], "jpeg-baseline": ["-xy"],
           "jpeg-lossless-sv1": ["-xs"], "jpeg-ls-lossless": ["-xt"], "jpeg-ls-near": ["-xu"],
           "j2k-lossless": ["-xv"], "j2k-lossy": ["-xw"]}


def _storescu(paths: list[Path], port: int, options: list[str]) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    return subprocess.run(
        [str(exe), *options, "-aet", "SCANNER", "-aec", "LIVERNODE", "127.0.0.1", str(port),
         *map(str, paths)], capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def node(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[NodeServer]:
    settings = Settings(port=free_port(), spool_dir=tmp_path / "spool", stable_seconds=60.0)
    with NodeServer(replace(settings, min_free_bytes=0), lambda *_: None) as server:
        yield server


def _eight_bit(ds: Dataset) -> Dataset:
    """JPEG Baseline carries 8-bit samples only (ISO/IEC 10918-1 process 1); DCMTK's
    near-lossless JPEG-LS encoder takes unsigned samples only."""
    pixels = ds.pixel_array.astype(np.int32)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = ((pixels * 7) % 256).astype(np.uint8).tobytes()
    return ds


def _encode(src: Path, dst: Path, tool: list[str], syntax: str) -> None:
    if tool == ["pydicom"]:
        ds = dcmread(src)
        kwargs = {"j2k_cr": [15]} if syntax == JPEG2000 else {}
        ds.compress(UID(syntax), encoding_plugin="pylibjpeg", generate_instance_uid=False,
                    **kwargs)
        ds.save_as(dst, enforce_file_format=True)
        return
    exe = require_tool(tool[0])
    result = subprocess.run([str(exe), *tool[1:], str(src), str(dst)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_syntax_is_stored_as_sent_and_decodes(node: NodeServer, tmp_path: Path, case: str) -> None:
    tool, syntax, lossless, eight_bit = CASES[case]
    series = make_ct_series(n=2, size=64)
    if eight_bit:
        series = [_eight_bit(ds) for ds in series]
    sources = write_files(series, tmp_path / "src")
    sent = []
    for src in sources:
        dst = tmp_path / "enc" / src.name
        dst.parent.mkdir(exist_ok=True)
        _encode(src, dst, tool, syntax)
        assert dcmread(dst).file_meta.TransferSyntaxUID == syntax
        sent.append(dst)
    result = _storescu(sent, node.port, PROPOSE.get(case, []))
    assert result.returncode == 0, result.stderr
    for ds, path in zip(series, sent, strict=True):
        record = node.spool.instance(ds.SOPInstanceUID)
        assert record is not None
        stored = dcmread(record.path)
        assert stored.file_meta.TransferSyntaxUID == syntax
        voxels = stored.pixel_array
        assert np.array_equal(voxels, dcmread(path).pixel_array)
        if lossless:
            assert np.array_equal(voxels, ds.pixel_array)
        else:
            error = np.abs(voxels.astype(float) - ds.pixel_array.astype(float)).mean()
            assert error < 0.05 * float(np.ptp(ds.pixel_array)), error


def _enhanced_ct(frames: int = 3) -> Dataset:
    """A multi-frame Enhanced CT dataset (PS3.3 A.38) with the attributes the node checks."""
    base = make_ct_series(n=1, size=32)[0]
    base.SOPClassUID = EnhancedCTImageStorage
    base.NumberOfFrames = frames
    cube = (np.arange(frames * 32 * 32).reshape(frames, 32, 32) % 3000).astype(np.int16)
    base.PixelData = cube.tobytes()
    return base


def test_enhanced_ct_multiframe_jpeg_ls_and_sr(node: NodeServer, tmp_path: Path) -> None:
    ds = _enhanced_ct()
    src = write_files([ds], tmp_path / "src")[0]
    dst = tmp_path / "mf.dcm"
    _encode(src, dst, ["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80")
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = ds.StudyInstanceUID, generate_uid()
    sr.Modality, sr.PatientID, sr.ValueType = "SR", ds.PatientID, "CONTAINER"
    sr.file_meta = ds.file_meta.__class__()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr_path = write_files([sr], tmp_path / "sr")[0]
    result = _storescu([dst], node.port, ["-xt"])
    assert result.returncode == 0, result.stderr
    result = storescu([sr_path], node.port)
    assert result.returncode == 0, result.stderr
    record = node.spool.instance(ds.SOPInstanceUID)
    assert record is not None
    voxels = dcmread(record.path).pixel_array
    assert voxels.shape == (3, 32, 32)
    assert np.array_equal(voxels, ds.pixel_array)
    assert node.spool.instance(sr.SOPInstanceUID) is not None
