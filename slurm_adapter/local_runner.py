"""Runs one LocalCluster job: `python -I local_runner.py <state dir>`.

It is the leader of the job's own session, so it outlives the orchestrator
that started it, and it records how the job ended in `<state dir>/exit.json`.
Stdlib only, no package imports: it runs as a plain script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_GRACE_S = 5


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(state_dir: Path) -> None:
    job = json.loads((state_dir / "job.json").read_text())
    # Cancelling signals the whole process group; a handler (unlike SIG_IGN,
    # which the child would inherit) lets this runner live to record the end.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with open(job["log_path"], "ab", buffering=0) as log:
        proc = subprocess.Popen(
            ["/bin/bash", job["script"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=job["work_dir"],
        )
    timed_out = False
    try:
        status = proc.wait(timeout=job["time_limit_minutes"] * 60)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(0, signal.SIGTERM)
        try:
            status = proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
    _write_json(
        state_dir / "exit.json",
        {
            "exit_code": status if status >= 0 else None,
            "signal": -status if status < 0 else None,
            "timed_out": timed_out,
            "end_time": time.time(),
        },
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
