"""Deterministic UIDs: the same inputs and algorithm version give the same UIDs.

A retry or a re-analysis of unchanged input therefore never duplicates objects in the archive.
UIDs are 2.25 UUID-derived UIDs (PS3.5 B.2) from a hash of the given parts.
"""

from __future__ import annotations

import hashlib

from node import ALGORITHM_VERSION


def derive_uid(*parts: str) -> str:
    """Return a 2.25.* UID derived from ``parts`` and the algorithm version."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    # pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores the entropy sources and
    # returns a random UUID UID, so the hash is built here.
    digest = hashlib.sha256("\0".join(["liver-node", ALGORITHM_VERSION, *parts]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def input_key(sop_instance_uids: list[str]) -> str:
    """A stable key for a set of input instances (order does not matter).

    Outputs derive their UIDs from the study UID plus this key, so re-analysing the same
    instances yields the same UIDs, while a study that gained a series yields new ones.
    """
    h = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        h.update(uid.encode("ascii") + b"\0")
    return h.hexdigest()[:32]
