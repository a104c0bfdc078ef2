"""Values from the wire made safe to log: escaped and cut to a bounded length.

A peer chooses its AE title, every UID and every text value it sends; logged raw, a NUL byte
truncates or corrupts a log line, an escape sequence repaints an operator's terminal and a
10 000-character value floods the journal. :func:`shown` is the one helper for a value that
came from the wire; :class:`SafeValuesFilter` applies it to every argument of a log record
(the node installs it on its log handlers as a backstop for values logged elsewhere, e.g.
inside exception messages of the libraries).
"""
from __future__ import annotations

import logging

__all__ = ["SafeValuesFilter", "shown"]

DEFAULT_LIMIT = 200


def _escape(text: str) -> str:
    # Printable characters stay (a name in Latin, Greek or CJK script reads as itself); every
    # other code point - controls, NUL, DEL, bidi overrides, lone surrogates - is escaped the
    # way Python's repr would, so that the line shows what was sent.
    out = []
    for ch in text:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def shown(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as a printable string of at most ``limit`` characters plus a length note.

    bytes are shown byte by byte (ASCII as is, others as ``\\xNN``), never decoded; strings
    keep their printable characters. A longer result is cut and ends with
    ``... (N characters)``, N being the length of the original value.
    """
    if limit < 1:
        raise ValueError(f"shown: limit expected >= 1, got {limit}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else
                       "\\\\" if b == 0x5C else f"\\x{b:02x}" for b in raw)
        n = len(raw)
    else:
        s = value if isinstance(value, str) else str(value)
        text, n = _escape(s), len(s)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({n} characters)"


class SafeValuesFilter(logging.Filter):
    """Escape and cut the message and every argument of a record (see :func:`shown`).

    Numbers pass unchanged, so ``%d`` and ``%.1f`` still format; everything else becomes a
    safe string. The record is changed in place and always let through.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT, message_limit: int = 4 * DEFAULT_LIMIT) -> None:
        super().__init__()
        self.limit, self.message_limit = limit, message_limit

    def _arg(self, a: object) -> object:
        return a if isinstance(a, (int, float)) else shown(a, self.limit)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_dipnode_safe", False):
            return True  # already cleaned by the filter of another handler
        record._dipnode_safe = True
        # A literal format string of ours is short; a message built from wire text (or an
        # exception object logged as the message, as pynetdicom does) may not be.
        record.msg = shown(str(record.msg), self.message_limit).replace("\\\\", "\\")
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # A traceback keeps its lines; each is escaped and cut like a value.
            record.exc_text = "\n".join(shown(line, self.message_limit) for line in record.exc_text.splitlines())
        if isinstance(record.args, dict):
            record.args = {k: self._arg(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(self._arg(a) for a in record.args)
        return True
