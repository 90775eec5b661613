"""Result records of the analysis stage: plain data, no DICOM and no network.

These are the contract between ``analysis/`` (which fills them) and ``dicom/`` (which writes
them as SEG and TID 1500 SR) and ``pipeline.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class VolumetricResponse(enum.Enum):
    """The five-grade volumetric rule of the source study (see response.py for boundaries)."""

    CR = "CR"  # complete response: metastases disappeared
    PR = "PR"  # partial response: volume decreased by >= 50 %
    MR = "MR"  # minor response: decreased by >= 25 % and < 50 %
    SD = "SD"  # stable disease: change strictly between -25 % and +25 %
    PD = "PD"  # progressive disease: increased by >= 25 %


@dataclass
class LesionMeasurement:
    """Measurements of one lesion, all on the reference (portal venous) grid.

    ``label`` is the lesion's value in :attr:`AnalysisResult.lesion_labels` (1..n). Patient
    coordinates are DICOM LPS in mm. ``key_slice`` is the slice index (into the reference
    volume's datasets) with the largest lesion area; ``outline_ij`` the closed outline of the
    lesion on that slice as (column, row) pixel coordinates, first point == last point, which is
    what a TID 1410 2D POLYLINE SCOORD holds (PS3.3 C.18.6.1.1: column, row order).
    """

    label: int
    tracking_id: str  # human-readable, e.g. "Lesion 1"
    tracking_uid: str  # same UID for the same lesion at every time point
    volume_ml: float
    longest_diameter_mm: float  # longest axial diameter (on key_slice)
    short_axis_mm: float  # longest diameter perpendicular to it, same slice
    key_slice: int
    long_axis_ij: tuple[tuple[float, float], tuple[float, float]]  # (column, row) end points
    short_axis_ij: tuple[tuple[float, float], tuple[float, float]]
    outline_ij: list[tuple[float, float]]
    area_mm2: float  # area on key_slice
    centroid_xyz: tuple[float, float, float]
    mean_hu: dict[str, float] = field(default_factory=dict)  # Phase.value -> mean HU
    # Follow-up only: the matched prior lesion (None = new lesion).
    prior_volume_ml: float | None = None
    is_new: bool = False
    # Characterisation (node.analysis.enhancement); None / empty where not measurable.
    largest_diameter_3d_mm: float | None = None  # longest distance between two lesion points
    sd_hu: dict[str, float] = field(default_factory=dict)  # Phase.value -> SD of HU
    #: Phase.value -> mean HU minus the mean HU of the same voxels on the plain scan.
    enhancement_vs_native_hu: dict[str, float] = field(default_factory=dict)
    #: Phase.value -> mean HU minus the liver parenchyma's median HU in that phase.
    enhancement_vs_liver_hu: dict[str, float] = field(default_factory=dict)
    enhancing_volume_ml: float | None = None  # viable: enhancing tissue, lipiodol excluded
    necrotic_volume_ml: float | None = None  # non-enhancing tissue, lipiodol excluded
    necrotic_fraction: float | None = None  # necrotic / lesion volume
    lipiodol_volume_ml: float | None = None  # dense in every phase incl. plain (never enhancing)
    size_pattern: str | None = None  # "homogeneous" (< 2 cm) | "heterogeneous" | "necrotic"
    #: Phase.value -> "hyper" | "iso" | "hypo" against the liver (viable part of the lesion).
    phase_behaviour: dict[str, str] = field(default_factory=dict)


@dataclass
class PriorLesion:
    """A lesion as the archive knows it from an earlier time point (read from SR + SEG)."""

    tracking_id: str
    tracking_uid: str
    volume_ml: float
    longest_diameter_mm: float | None = None
    centroid_xyz: tuple[float, float, float] | None = None


@dataclass
class PriorStudy:
    """What the node knows of one earlier time point of the same patient."""

    study_instance_uid: str
    study_date: str
    lesions: list[PriorLesion]
    liver_centroid_xyz: tuple[float, float, float] | None = None
    sr_sop_instance_uid: str = ""


@dataclass
class ResponseAssessment:
    """Follow-up versus prior: the volumetric rule of the source study."""

    prior_study_instance_uid: str
    prior_total_volume_ml: float
    current_total_volume_ml: float
    change_fraction: float  # (current - prior) / prior; -1.0 for complete disappearance
    category: VolumetricResponse
    new_lesions: int
    vanished_lesions: list[str]  # tracking ids of prior lesions not found any more


@dataclass
class PhaseAlignment:
    """How one phase was brought onto the reference (portal venous) grid.

    ``shift_mm`` is the patient-space (DICOM LPS) translation from the reference to the phase,
    ``rotation_deg`` the rotation about the x, y and z axes (0 without rotation);
    ``residual_mm`` the largest translation still found between the aligned phase and the
    reference in the liver region or one of its octants (None: not measured);
    ``rigid_residual_mm`` the same after the rigid step alone; ``deformation_mm`` the largest
    displacement the constrained deformable step added in the liver region (0: rigid only).
    """

    phase: str  # Phase.value
    #: "rigid", "rigid+deformable", "translation", "geometry", or "failed" (phase not used).
    method: str
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    residual_mm: float | None = None
    rigid_residual_mm: float | None = None
    deformation_mm: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class AnalysisResult:
    """Everything the analysis of one study produced."""

    study_instance_uid: str
    liver_mask: np.ndarray  # bool, reference grid
    lesion_labels: np.ndarray  # int32, reference grid, 0 = background, n = lesion label n
    lesions: list[LesionMeasurement]
    liver_volume_ml: float
    liver_centroid_xyz: tuple[float, float, float]
    response: ResponseAssessment | None = None
    notes: list[str] = field(default_factory=list)
    #: The liver measured like a lesion (volume, outline and axes on its largest axial slice):
    #: the SR gives the liver a planar group beside its volumetric one, as viewers need.
    liver: LesionMeasurement | None = None
    #: Phase.value -> median HU of the liver parenchyma (lesions and vessels excluded).
    liver_median_hu: dict[str, float] = field(default_factory=dict)
    #: How each phase other than the reference was aligned onto it (sorted by phase).
    alignments: list[PhaseAlignment] = field(default_factory=list)

    @property
    def total_volume_ml(self) -> float:
        """Sum of the lesion volumes (ml)."""
        return float(sum(les.volume_ml for les in self.lesions))

    @property
    def tumour_burden_percent(self) -> float | None:
        """Total lesion volume as a share of the liver volume (lesions included), %."""
        if self.liver_volume_ml <= 0:
            return None
        return 100.0 * self.total_volume_ml / self.liver_volume_ml
