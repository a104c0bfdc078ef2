"""Deterministic UIDs: the same job and role always give the same UID, so a re-send is
idempotent (a PACS replaces the instance instead of storing a duplicate).

The UID is ``2.25.<decimal>`` of a name-based (SHA-1, version 5) UUID of the parts (PS3.5
Annex B.2), so no registered root is needed and collisions are as unlikely as for random
UUIDs. pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` is NOT used: with
``prefix=None`` pydicom 3.0 ignores ``entropy_srcs`` and returns a random UUID.
"""
from __future__ import annotations

import uuid

from dipnode.dicom_io.errors import DicomOutputError

# Separator that cannot appear in a UID or in the plain strings we hash, so ("a.b", "c")
# and ("a", "b.c") do not collide.
_SEP = "\x1f"
# Fixed namespace for this project (itself uuid5 of the URL namespace and the project name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "dipnode")


def derive_uid(*parts: str) -> str:
    """Return a UID that depends only on ``parts`` (order matters)."""
    if not parts:
        raise DicomOutputError("derive_uid: argument parts expected at least one string, got none")
    for index, part in enumerate(parts):
        if not isinstance(part, str) or part == "":
            raise DicomOutputError(
                f"derive_uid: argument parts[{index}] expected a non-empty str, got {part!r}"
            )
    # Joining with a separator keeps part boundaries significant.
    return f"2.25.{uuid.uuid5(_NAMESPACE, _SEP.join(parts)).int}"
