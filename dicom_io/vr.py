"""Value rules of PS3.5 that the node checks in several places: AE titles and UIDs.

One function per rule, called by the receiver and sender configurations, the settings, the
spool (UIDs name its files) and the writers, so that a value one part accepts is never refused
by another (a tab in an AE title once passed the receiver's check and failed the settings').
"""
from __future__ import annotations

import re

from .errors import ConfigError
from .logsafe import shown

__all__ = ["AE_MAX", "UID_MAX", "InvalidUIDError", "check_ae_title", "check_uid", "is_uid"]

# PS3.5 6.2, VR AE: 16 bytes maximum of the default character repertoire without backslash
# (5CH) and control characters; leading and trailing spaces are not significant.
AE_MAX = 16
# PS3.5 9.1: digit components separated by '.', at most 64 characters in all.
UID_MAX = 64
# What PS3.5 9.1 allows: no leading zero in a component ("0" itself excepted).
_UID_STRICT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# What the node accepts from the wire: some vendors emit leading zeros; accepting them is
# harmless because only digits and dots reach the file system (UIDs name spool files).
_UID_LENIENT = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUIDError(ValueError):
    """A UID that does not follow PS3.5 9.1 and so cannot name a file or an output."""


def check_ae_title(name: str, value: str) -> str:
    """``value`` without its padding spaces if it is an AE title (PS3.5 6.2), else ConfigError
    naming ``name`` (the setting, option or argument the value came from)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected an AE title (text), got {value!r}")
    stripped = value.strip(" ")
    if not stripped:
        raise ConfigError(f"{name}: expected 1-{AE_MAX} non-space characters (PS3.5 6.2 AE), "
                          f"got {value!r}")
    if len(stripped) > AE_MAX:
        raise ConfigError(f"{name}: expected 1-{AE_MAX} characters (PS3.5 6.2 AE), got "
                          f"{len(stripped)} in {value!r}")
    bad = sorted({c for c in stripped if c == "\\" or not " " <= c <= "~"})
    if bad:
        raise ConfigError(f"{name}: expected 1-{AE_MAX} printable ASCII characters without "
                          f"backslash (PS3.5 6.2 AE), got {value!r} with {bad!r}")
    return stripped


def is_uid(value: object, *, strict: bool = True) -> bool:
    """Whether ``value`` is a UID: PS3.5 9.1 exactly (``strict``, for UIDs we write) or with
    leading zeros in components allowed (what the node accepts from senders)."""
    pattern = _UID_STRICT if strict else _UID_LENIENT
    return isinstance(value, str) and len(value) <= UID_MAX and pattern.fullmatch(value) is not None


def check_uid(name: str, value: object, *, strict: bool = False) -> str:
    """Return ``value`` if it is a UID (see :func:`is_uid`), else raise InvalidUIDError."""
    if not is_uid(value, strict=strict):
        raise InvalidUIDError(
            f"{name}: expected a DICOM UID (PS3.5 9.1: digits and '.', at most {UID_MAX} "
            f"characters), got {shown(value, 80)}"
        )
    return value  # type: ignore[return-value]
