"""Named DIMSE status codes for the Storage and Verification services.

Codes come from PS3.7 Annex C (general statuses, C.4.2.1.4 for C-STORE) and PS3.4 Annex B.2.3
(Storage Service Class specific statuses). Everywhere else in the node a status is spelled by
name; bare hex belongs only here.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status", "StoreRefused", "describe", "is_stored"]


class Status(IntEnum):
    """DIMSE status values a C-STORE / C-ECHO exchange can carry."""

    # PS3.7 C.1.1: the operation completed.
    SUCCESS = 0x0000

    # PS3.4 B.2.3: Storage-specific failures (ranges A7xx, A9xx, Cxxx; the base codes, and
    # codes of our own inside those ranges so that a sender's log tells the reasons apart).
    OUT_OF_RESOURCES = 0xA700
    INSTANCE_TOO_LARGE = 0xA701  # beyond max_instance_mb (on the wire or once decoded)
    INFLATED_TOO_LARGE = 0xA702  # a deflated data set that inflates beyond max_instance_mb
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_MISMATCH = 0xC001  # data encoded against another syntax than negotiated

    # PS3.4 B.2.3: Storage-specific warnings (the instance was stored).
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007

    # PS3.7 C.4.2.1.4 / Annex C general failures.
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    DUPLICATE_INVOCATION = 0x0210
    INVALID_SOP_INSTANCE = 0x0117
    MISTYPED_ARGUMENT = 0x0212
    UNRECOGNIZED_OPERATION = 0x0211
    NOT_AUTHORIZED = 0x0124
    REFUSED_OUT_OF_RESOURCES = 0x0213

    # PS3.7 C.4.2.1.4 general warnings.
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    ATTRIBUTE_LIST_ERROR = 0x0107


# PS3.7 Annex C: a warning means the peer did store the instance (possibly with changes).
_WARNINGS = frozenset(
    {
        Status.COERCION_OF_DATA_ELEMENTS,
        Status.ELEMENTS_DISCARDED,
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
        Status.ATTRIBUTE_VALUE_OUT_OF_RANGE,
        Status.ATTRIBUTE_LIST_ERROR,
    }
)


def is_stored(code: int) -> bool:
    """True when a C-STORE response status means the instance is stored (success or warning).

    PS3.4 B.2.3 lets a peer answer with any code in a range (0xA7xx, 0xB0xx, ...); only the
    warning codes listed in the standard count as stored, anything unknown counts as failure.
    """
    return code == Status.SUCCESS or code in _WARNINGS


def describe(code: int) -> str:
    """A short human text for a status code, e.g. ``'OUT_OF_RESOURCES (0xA700)'``."""
    try:
        name = Status(code).name
    except ValueError:
        # PS3.4 B.2.3: failures are ranges; name the range for codes we do not list exactly.
        if 0xA700 <= code <= 0xA7FF:
            name = "OUT_OF_RESOURCES"
        elif 0xA900 <= code <= 0xA9FF:
            name = "DATASET_DOES_NOT_MATCH_SOP_CLASS"
        elif 0xC000 <= code <= 0xCFFF:
            name = "CANNOT_UNDERSTAND"
        else:
            name = "UNKNOWN"
    return f"{name} (0x{code:04X})"


class StoreRefused(Exception):
    """Raised by a C-STORE consumer (``on_store``, the spool) to answer with a chosen status.

    The SCP answers the peer with ``status`` and keeps serving; ``reason`` goes to the log.
    """

    def __init__(self, status: Status, reason: str) -> None:
        if not isinstance(status, Status) or status == Status.SUCCESS or status in _WARNINGS:
            raise ValueError(f"StoreRefused status: expected a failure Status, got {status!r}")
        super().__init__(f"{describe(status)}: {reason}")
        self.status = status
        self.reason = reason
