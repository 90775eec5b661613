"""The segmentation backend interface: one small Protocol, the classical method as default.

A backend turns the reference volume into a liver segmentation and the aligned phases into a
lesion label map. :func:`node.analysis.run.analyze` only talks to this interface, so another
method (e.g. a learned one, once it can be tested and shipped without network access) plugs in
without touching measurements, tracking or response. The default is the classical, CPU-only,
weight-free and explainable method of :mod:`node.analysis.liver`, :mod:`node.analysis.lesions`
and :mod:`node.analysis.delineate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from node.analysis.lesions import LesionMaps, detect_lesions
from node.analysis.liver import LiverSegmentation, segment_liver
from node.study.model import Geometry, Phase


@runtime_checkable
class SegmentationBackend(Protocol):
    """What the analysis needs of a segmenter.

    Attributes
    ----------
    name, version:
        Algorithm Identification (PS3.3 C.8.20.2.1: Algorithm Name / Algorithm Version) of
        the outputs made with this backend.
    """

    name: str
    version: str

    def segment_liver(self, array: np.ndarray, geometry: Geometry,
                      exclude: np.ndarray | None = None) -> LiverSegmentation:
        """Liver mask and parenchyma statistics on the reference (portal venous) volume.

        ``exclude`` marks voxels known not to be liver (the blood pool seen in the aligned
        arterial phase); a backend may ignore it. Raises ValueError when no liver is found.
        """
        ...

    def detect_lesions(self, phases: Mapping[Phase, np.ndarray], liver: np.ndarray,
                       soft_tissue: np.ndarray, geometry: Geometry) -> LesionMaps:
        """Lesion label map on the reference grid from the aligned phases."""
        ...


class ClassicalBackend:
    """Histogram/morphology liver segmentation and multi-phase deviation lesion detection."""

    name = "liver-node classical"
    # 2: lesion borders compensated for the in-plane smoothing; 3: hypo-density next to fat in
    # z is no lesion evidence, tissue measured across lipiodol, small dense lesions kept;
    # 4: "next to fat in z" is the adjacent slice only (3's extra 5 mm broke a real tumour)
    version = "4"

    def segment_liver(self, array: np.ndarray, geometry: Geometry,
                      exclude: np.ndarray | None = None) -> LiverSegmentation:
        """See :func:`node.analysis.liver.segment_liver`."""
        return segment_liver(array, geometry, exclude)

    def detect_lesions(self, phases: Mapping[Phase, np.ndarray], liver: np.ndarray,
                       soft_tissue: np.ndarray, geometry: Geometry) -> LesionMaps:
        """See :func:`node.analysis.lesions.detect_lesions`."""
        return detect_lesions(phases, liver, soft_tissue, geometry)


#: The backend used when the caller names none.
DEFAULT_BACKEND: SegmentationBackend = ClassicalBackend()
