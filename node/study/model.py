"""The study model shared by every stage: phases, volumes, and the assembled study.

Array convention everywhere in the node: ``array[k, i, j]`` = (slice, row, column), i.e.
(z, y, x) in image space. Patient coordinates follow DICOM LPS (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


class Phase(enum.Enum):
    """Contrast phase of a CT volume (see shared clinical protocol)."""

    NATIVE = "native"  # plain, non-contrast
    ARTERIAL = "arterial"  # 20-25 s after injection
    PORTAL_VENOUS = "portal_venous"  # 45-55 s
    DELAYED = "delayed"  # 120-180 s
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Geometry:
    """Image-to-patient mapping of a regular volume (PS3.3 C.7.6.2).

    Attributes
    ----------
    origin:
        Patient position (x, y, z) in mm of voxel (0, 0, 0): ImagePositionPatient of slice 0.
    row_cosine, column_cosine:
        The two ImageOrientationPatient direction cosines (direction of increasing column
        index j, and of increasing row index i).
    slice_normal:
        Unit vector of increasing slice index k.
    spacing:
        (slice spacing, row spacing, column spacing) in mm, i.e. (dz, dy, dx) matching the
        array axes (k, i, j). Row spacing is PixelSpacing[0], column spacing PixelSpacing[1].
    shape:
        (slices, rows, columns).
    """

    origin: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    slice_normal: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (k, i, j, 1) to patient (x, y, z, 1)."""
        m = np.eye(4)
        dz, dy, dx = self.spacing
        m[:3, 0] = np.asarray(self.slice_normal) * dz
        m[:3, 1] = np.asarray(self.column_cosine) * dy
        m[:3, 2] = np.asarray(self.row_cosine) * dx
        m[:3, 3] = self.origin
        return m

    def index_to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of (k, i, j) indices (may be fractional) to (N, 3) patient mm."""
        kij = np.atleast_2d(np.asarray(kij, dtype=float))
        return kij @ self.affine()[:3, :3].T + np.asarray(self.origin)

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`index_to_patient`."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        inv = np.linalg.inv(self.affine()[:3, :3])
        return (xyz - np.asarray(self.origin)) @ inv.T

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0


@dataclass
class Volume:
    """One contrast phase as a regular 3D volume in Hounsfield units.

    ``datasets[k]`` is the header (pydicom Dataset, pixel data included) of the source image
    that holds slice ``k``: the SEG and SR reference these, in this order.
    """

    array: np.ndarray  # float32 HU, shape (slices, rows, columns)
    geometry: Geometry
    phase: Phase
    series_instance_uid: str
    datasets: list[Dataset]
    series_description: str = ""
    phase_evidence: str = ""  # why this phase was chosen (headers / images)
    #: Defects found while stacking and how they were handled (tilt, missing slices, ...).
    assembly_notes: list[str] = field(default_factory=list)


@dataclass
class Study:
    """An assembled study: one volume per recognised phase, plus identification."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str  # DICOM DA, YYYYMMDD ("" if absent)
    frame_of_reference_uid: str
    volumes: dict[Phase, Volume] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "series UID: reason" for series not used
    #: "series UID [acquisition]: defect" for assembly defects detected (and repaired or not).
    defects: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Volume:
        """The volume every measurement is made on: portal venous, else the best available."""
        for p in (Phase.PORTAL_VENOUS, Phase.DELAYED, Phase.ARTERIAL, Phase.NATIVE, Phase.UNKNOWN):
            if p in self.volumes:
                return self.volumes[p]
        raise LookupError("study has no volumes")
