from __future__ import annotations

import time
from pathlib import Path

from slurm_adapter import tail_log


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail_log(str(tmp_path / "nope.log")) == ""


def test_last_lines_of_a_huge_file_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with open(path, "wb") as f:
        # 20 GB of sparse zeros: reading it would take far longer than the assertion allows.
        f.truncate(20 * 1024**3)
        f.seek(0, 2)
        f.write(b"".join(b"line %d\n" % i for i in range(1000)))
    started = time.monotonic()
    text = tail_log(str(path), lines=3)
    assert time.monotonic() - started < 1.0
    assert text == "line 997\nline 998\nline 999"


def test_ansi_and_control_chars_stripped_bad_bytes_replaced(tmp_path: Path) -> None:
    path = tmp_path / "color.log"
    path.write_bytes(
        b"first\n\x1b[1;31mred\x1b[0m text\n\x1b]0;title\x07bell\x07 \x00nul\n"
        b"bad \xff\xfe bytes\nprogress 10%\rprogress 100%\n"
    )
    assert tail_log(str(path), lines=5) == ("red text\nbell nul\nbad \ufffd\ufffd bytes\nprogress 10%\nprogress 100%")


def test_fewer_lines_than_asked(tmp_path: Path) -> None:
    path = tmp_path / "short.log"
    path.write_text("only\n")
    assert tail_log(str(path), lines=50) == "only"
    assert tail_log(str(path), lines=0) == ""
