"""Attenuation per tissue and contrast phase (HU), as data, after the shared clinical protocol.

Each entry is a ``(low, high)`` range; :func:`draw_table` draws one value per tissue and phase
from it for a study (per-seed jitter: contrast timing and patient differ between studies).
Lesion values are DELTAS relative to the liver of the same phase. The acquisition follows the
source study: 80 kV, iohexol 300 mgI/ml 50 ml at 4-5 ml/s; arterial 20-25 s, portal venous
45-55 s, delayed 120-180 s after injection.
"""

from __future__ import annotations

import numpy as np

PHASES: tuple[str, ...] = ("native", "arterial", "portal_venous", "delayed")

#: tissue -> phase -> (low, high) HU
HU_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "air": {p: (-1000.0, -1000.0) for p in PHASES},
    "lung": {p: (-870.0, -830.0) for p in PHASES},
    "fat": {p: (-105.0, -95.0) for p in PHASES},
    "visceral_fat": {p: (-95.0, -85.0) for p in PHASES},
    "muscle": {
        "native": (45, 55),
        "arterial": (55, 65),
        "portal_venous": (60, 70),
        "delayed": (55, 65),
    },
    "bone_cancellous": {p: (230.0, 280.0) for p in PHASES},
    "bone_cortical": {p: (750.0, 900.0) for p in PHASES},
    "disc": {p: (80.0, 95.0) for p in PHASES},
    "csf": {p: (10.0, 18.0) for p in PHASES},
    "aorta": {
        "native": (38, 45),
        "arterial": (250, 350),
        "portal_venous": (150, 180),
        "delayed": (110, 135),
    },
    "heart": {
        "native": (38, 45),
        "arterial": (200, 280),
        "portal_venous": (150, 175),
        "delayed": (110, 130),
    },
    "ivc": {
        "native": (38, 45),
        "arterial": (80, 110),
        "portal_venous": (140, 165),
        "delayed": (110, 130),
    },
    "portal_vein": {
        "native": (38, 45),
        "arterial": (100, 150),
        "portal_venous": (170, 200),
        "delayed": (115, 135),
    },
    "hepatic_vein": {
        "native": (38, 45),
        "arterial": (50, 70),
        "portal_venous": (150, 180),
        "delayed": (115, 135),
    },
    "liver": {
        "native": (52, 58),
        "arterial": (65, 75),
        "portal_venous": (110, 120),
        "delayed": (90, 100),
    },
    "spleen": {
        "native": (44, 50),
        "arterial": (110, 140),
        "portal_venous": (115, 130),
        "delayed": (95, 110),
    },
    "kidney": {
        "native": (30, 38),
        "arterial": (160, 200),
        "portal_venous": (160, 190),
        "delayed": (140, 170),
    },
    "stomach_wall": {
        "native": (38, 45),
        "arterial": (80, 100),
        "portal_venous": (90, 110),
        "delayed": (75, 90),
    },
    "stomach_content": {p: (5.0, 15.0) for p in PHASES},
    "bowel": {
        "native": (30, 40),
        "arterial": (70, 90),
        "portal_venous": (85, 100),
        "delayed": (70, 85),
    },
    "gas": {p: (-980.0, -940.0) for p in PHASES},
    # Lesions, relative to the liver of the same phase (protocol: slightly low on the plain
    # scan, hyper-enhancing in the arterial phase, iso to slightly hyper in the portal venous
    # phase, wash-out in the delayed phase).
    "lesion_delta": {
        "native": (-15, -10),
        "arterial": (40, 70),
        "portal_venous": (0, 10),
        "delayed": (-30, -15),
    },
    # Non-enhancing necrotic / cystic areas and lipiodol: absolute, the same in every phase.
    "necrosis": {p: (20.0, 30.0) for p in PHASES},
}

#: Lipiodol (iodised oil after TACE): dense in every phase, drawn per deposit.
LIPIODOL_HU: tuple[float, float] = (150.0, 600.0)


def draw_table(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """One study's attenuation table: a value per tissue and phase drawn from :data:`HU_RANGES`.

    Tissues whose range is the same in every phase get ONE draw shared by all phases, so
    non-enhancing tissue is identical across phases.
    """
    table: dict[str, dict[str, float]] = {}
    for tissue, ranges in HU_RANGES.items():
        values = [ranges[p] for p in PHASES]
        if all(v == values[0] for v in values):
            v = float(rng.uniform(*values[0]))
            table[tissue] = {p: v for p in PHASES}
        else:
            table[tissue] = {p: float(rng.uniform(*ranges[p])) for p in PHASES}
    return table
