"""Faults in the Slurm command-line tools, for processes the tests start: slow, failing or altered calls.

`SlurmFaults(dir).env()` puts `bin/` (an `sbatch`, `sacct`, `squeue` and `scancel` that are
`shim.py`) first on a process's PATH and names the control file; the test then says, at any
moment, what those commands do:

    faults.stall("sbatch", 30, when="after")            # the job is created, its id comes 30 s late
    faults.stall("sbatch", 30, when="before", times=1)  # the first call hangs 30 s before running
    faults.fail("sbatch", stderr="sbatch: error: ...", match="--partition=nope")
    faults.add_args("sbatch", ["--hold"])               # what is submitted is held
    faults.calls("sbatch")                              # every call so far, with its outcome

A stall is the shim sleeping, so a caller's timeout kills it as it would kill a slow sbatch:
killed while stalling *before*, the real command never runs (no job); killed while stalling
*after*, the job exists and its id is never told. See `shim.py` for the rules.
"""

import json
import os
import uuid
from pathlib import Path

from tests.slurm_faults.shim import CALLS_FILE, COMMANDS, CONTROL_ENV, Locked, read_json, write_json_atomically

BIN_DIR = Path(__file__).resolve().parent / "bin"


class SlurmFaults:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.control_path = self.directory / "faults.json"
        self.calls_path = self.directory / CALLS_FILE
        self.clear()

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """PATH (the shim first, then `base`'s PATH or ours) and EMG_SLURM_FAULTS, to add to a process's env."""
        path = (base if base is not None else os.environ).get("PATH", os.defpath)
        return {"PATH": f"{BIN_DIR}{os.pathsep}{path}", CONTROL_ENV: str(self.control_path)}

    # --- what the commands do -------------------------------------------------------------------
    def stall(
        self, command: str, seconds: float, *, when: str = "after", times: int | None = None, match: str | None = None
    ) -> str:
        """Sleep `seconds` before running the real command (`when="before"`: the controller is slow to
        accept) or after it, holding back its answer (`when="after"`: the job exists, the answer is late)."""
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', not {when!r}")
        return self._add(command, "stall", times, match, seconds=seconds, when=when)

    def fail(
        self, command: str, *, stderr: str, exit_code: int = 1, match: str | None = None, times: int | None = None
    ) -> str:
        """Answer with `stderr` and `exit_code` instead of running the real command."""
        return self._add(command, "fail", times, match, stderr=stderr, exit_code=exit_code)

    def add_args(self, command: str, args: list[str], *, match: str | None = None, times: int | None = None) -> str:
        """Run the real command with `args` inserted before the caller's own (a later option wins in
        Slurm's tools, so the caller's override these): e.g. a real invalid partition for one job."""
        return self._add(command, "add_args", times, match, args=list(args))

    def clear(self) -> None:
        """No faults from now on (calls in flight keep the ones they got); the calls log stays."""
        self._write([])

    def remove(self, fault_id: str) -> None:
        self._write([fault for fault in self._faults() if fault["id"] != fault_id])

    # --- what happened --------------------------------------------------------------------------
    def calls(self, command: str | None = None) -> list[dict]:
        """Calls so far, oldest first, each one dict: command, argv, time (started), pid, ppid, the
        fault ids it got, and once it answered: outcome ("ran" or "failed"), exit_code, ended,
        stalled_before/after, stdout, stderr. A call still running, or killed, has outcome None."""
        with Locked(str(self.directory)):
            lines = self.calls_path.read_text().splitlines() if self.calls_path.exists() else []
        calls: dict[str, dict] = {}
        for record in map(json.loads, lines):
            if record["phase"] == "start":
                calls[record["call"]] = {**record, "outcome": None, "exit_code": None, "ended": None}
            elif record["call"] in calls:
                ended = {**record, "ended": record["time"]}
                for key in ("phase", "time", "command", "pid"):
                    ended.pop(key)
                calls[record["call"]].update(ended)
        return [call for call in calls.values() if command is None or call["command"] == command]

    # --- the control file ---------------------------------------------------------------------
    def _add(self, command: str, action: str, times: int | None, match: str | None, **details) -> str:
        if command not in COMMANDS:
            raise ValueError(f"the shim covers {', '.join(COMMANDS)}, not {command!r}")
        fault_id = uuid.uuid4().hex[:12]
        self._write(
            [
                *self._faults(),
                {"id": fault_id, "command": command, "action": action, "times": times, "match": match, **details},
            ]
        )
        return fault_id

    def _faults(self) -> list[dict]:
        return read_json(str(self.control_path), {}).get("faults", [])

    def _write(self, faults: list[dict]) -> None:
        # Replaced whole (write, fsync, rename): a shim reading meanwhile sees the old faults or the new.
        write_json_atomically(str(self.control_path), {"faults": faults})
