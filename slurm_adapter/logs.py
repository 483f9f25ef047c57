"""Reading the end of a job log for humans: bounded, decoded, and terminal-safe."""

from __future__ import annotations

import os
import re

_BLOCK = 64 * 1024
# CSI (colours, cursor moves), OSC (titles, links) and other two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    text = _ANSI.sub("", text)
    # Progress bars rewrite a line with lone CRs; each rewrite is shown as its own line.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def tail_log(path: str, lines: int = 50, max_bytes: int = 1024 * 1024) -> str:
    """The last `lines` lines of a file, reading backwards at most `max_bytes`; "" if missing."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            data = b""
            # One more newline than wanted: the first (partial) line is then dropped.
            while pos > 0 and data.count(b"\n") <= lines and end - pos < max_bytes:
                step = min(_BLOCK, pos, max_bytes - (end - pos))
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""
    text = clean_text(data.decode("utf-8", errors="replace"))
    kept = text.rstrip("\n").split("\n")
    return "\n".join(kept[-lines:])
