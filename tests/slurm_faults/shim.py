#!/usr/bin/env python3
"""The fault-injection shim for the Slurm CLI: run as `sbatch`, `sacct`, `squeue` or `scancel`.

`tests/slurm_faults/bin/` holds one symlink per command to this file; put first on a process's
PATH, each call reads the control file named by `EMG_SLURM_FAULTS` (JSON, written by
`tests.slurm_faults.SlurmFaults`; no variable or no file: pass through) and then:

1. logs the call (`calls.jsonl` beside the control file: one "start" line now, one "end" line
   when it answers; a call killed meanwhile has no "end" line);
2. sleeps the `stall` faults' seconds with `when: before` (the controller is slow to accept):
   the real command has not run yet, so a caller that gives up and kills us leaves no job;
3. fails as a `fail` fault says (its stderr, its exit code), without running the real command;
4. or runs the real command (the same name on PATH once our own directory is left out), with
   any `add_args` faults' arguments inserted first;
5. sleeps the `stall` faults' seconds with `when: after` holding the real command's answer
   (the job exists, the answer is late): a caller that kills us meanwhile never learns it.

Each fault applies to the calls of its command whose arguments (joined with spaces) contain
its `match`, if it has one, and to the first `times` such calls only, if it says so. Choosing
the faults and counting them happens under an exclusive lock, so concurrent calls count right.
Only the standard library: it runs under whichever python3 the caller's PATH finds.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

COMMANDS = ("sbatch", "sacct", "squeue", "scancel")
CONTROL_ENV = "EMG_SLURM_FAULTS"
CALLS_FILE = "calls.jsonl"
COUNTS_FILE = "counts.json"
LOCK_FILE = "faults.lock"
OUTPUT_LOGGED = 2000  # characters of the real command's stdout kept in the calls log


def real_binary(command: str) -> str | None:
    """`command` on PATH, leaving out the directory this shim is called from (any symlink to it)."""
    own = {
        os.path.realpath(os.path.dirname(os.path.abspath(sys.argv[0]))),
        os.path.realpath(os.path.dirname(os.path.realpath(__file__))),
    }
    own.add(os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "bin")))
    rest = [
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and os.path.realpath(entry) not in own
    ]
    return shutil.which(command, path=os.pathsep.join(rest))


def read_json(path: str, default):
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return default


def write_json_atomically(path: str, value) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(value, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Locked:
    """The shims' and the controller's exclusive lock over the counts and the calls log."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)

    def __enter__(self):
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def append_call(directory: str, record: dict) -> None:
    with open(os.path.join(directory, CALLS_FILE), "a") as file:
        file.write(json.dumps(record) + "\n")


def applies(fault: dict, command: str, argv: list[str], counts: dict) -> bool:
    if fault.get("command") != command:
        return False
    if fault.get("match") and fault["match"] not in " ".join(argv[1:]):
        return False
    times = fault.get("times")
    return times is None or counts.get(fault["id"], 0) < times


def choose_faults(directory: str, control_path: str, command: str, argv: list[str], call: str) -> list[dict]:
    """The faults this call gets, counted, and the call's "start" line logged, all under the lock."""
    with Locked(directory):
        faults = read_json(control_path, {}).get("faults", [])
        counts_path = os.path.join(directory, COUNTS_FILE)
        counts = read_json(counts_path, {})
        chosen = [fault for fault in faults if applies(fault, command, argv, counts)]
        if chosen:
            for fault in chosen:
                counts[fault["id"]] = counts.get(fault["id"], 0) + 1
            write_json_atomically(counts_path, counts)
        append_call(
            directory,
            {
                "call": call,
                "phase": "start",
                "command": command,
                "argv": argv,
                "time": time.time(),
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "faults": [fault["id"] for fault in chosen],
            },
        )
    return chosen


def main() -> int:
    command = os.path.basename(sys.argv[0])
    if command not in COMMANDS:
        print(f"slurm fault shim: called as {command!r}, not one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    real = real_binary(command)
    if real is None:
        print(f"slurm fault shim: no real {command} on PATH", file=sys.stderr)
        return 127
    argv = [command, *sys.argv[1:]]
    control_path = os.environ.get(CONTROL_ENV)
    directory = os.path.dirname(os.path.abspath(control_path)) if control_path else None
    if directory is None or not os.path.isdir(directory):
        os.execv(real, [real, *sys.argv[1:]])  # no controller: be the real command
    call = f"{os.getpid()}-{time.time_ns()}"
    faults = choose_faults(directory, control_path, command, argv, call)

    def stall(when: str) -> float:
        seconds = sum(f["seconds"] for f in faults if f["action"] == "stall" and f.get("when") == when)
        if seconds:
            time.sleep(seconds)  # the fault itself: a caller's timeout kills us here like a slow command
        return seconds

    def end(outcome: str, exit_code: int, **details) -> int:
        with Locked(directory):
            append_call(
                directory,
                {
                    "call": call,
                    "phase": "end",
                    "command": command,
                    "time": time.time(),
                    "pid": os.getpid(),
                    "outcome": outcome,
                    "exit_code": exit_code,
                    **details,
                },
            )
        return exit_code

    stalled_before = stall("before")
    failure = next((f for f in faults if f["action"] == "fail"), None)
    if failure is not None:
        sys.stderr.write(failure["stderr"] if failure["stderr"].endswith("\n") else failure["stderr"] + "\n")
        sys.stderr.flush()
        return end("failed", failure["exit_code"], stalled_before=stalled_before, stderr=failure["stderr"])
    added = [arg for f in faults if f["action"] == "add_args" for arg in f["args"]]
    late = any(f["action"] == "stall" and f.get("when") == "after" for f in faults)
    # Captured either way, for the calls log; relayed as it came, at once or after the stall.
    proc = subprocess.run([real, *added, *sys.argv[1:]], stdin=sys.stdin, capture_output=True)
    stalled_after = stall("after") if late else 0
    sys.stdout.buffer.write(proc.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(proc.stderr)
    sys.stderr.flush()
    return end(
        "ran",
        proc.returncode,
        stalled_before=stalled_before,
        stalled_after=stalled_after,
        added_args=added,
        stdout=proc.stdout.decode(errors="replace")[:OUTPUT_LOGGED],
        stderr=proc.stderr.decode(errors="replace")[:OUTPUT_LOGGED],
    )


if __name__ == "__main__":
    sys.exit(main())
