"""Deterministic UIDs: the same inputs and algorithm version give the same UIDs.

A retry or a re-analysis of unchanged input therefore never duplicates objects in the archive.
UIDs are 2.25 UUID-derived UIDs (PS3.5 B.2) from a hash of the given parts.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

from node import ALGORITHM_VERSION


def derive_uid(*parts: str) -> str:
    """Return a 2.25.* UID derived from ``parts`` and the algorithm version."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    return str(generate_uid(prefix=None, entropy_srcs=["liver-node", ALGORITHM_VERSION, *parts]))
