"""Job arrays: many jobs of one shape given to Slurm as one submission.

A task of an array is a job of its own everywhere but in the submission: its own script (the
job script `build_script` makes of its spec, in its own work dir), its own log, its own state.
The array's script is the same for every array: it reads the task's script and log from a
manifest file by `SLURM_ARRAY_TASK_ID` and runs that script. The manifest holds paths only,
separated by NUL bytes (a path may hold any other byte), read by bash's `mapfile -d ''`:
no value of any spec is ever pasted into shell code.

Slurm names a task `<array id>_<index>` ("123_4"). A pending remainder of an array is one record
whose id lists the indices still pending: "123_[4-199%20]" in sacct and squeue, a hex bitmap
("0xE": indices 1-3) or a range string ("1-3") in slurmrestd's answers; `expand_task_ids` reads
them all, so a pending task is as visible as a running one.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .cluster import JobStatus
from .files import JOB_FILES_DIR, write_script
from .spec import JobSpec, validate_tag
from .states import JobState

# What Slurm's default MaxArraySize (1001) allows: indices 0-1000.
MAX_ARRAY_TASKS = 1000
# The array's own job name after its tag: tasks have names of their own, the array has one.
ARRAY_NAME = "array"
MANIFEST = "manifest"
TAGS = "tags"

_TASK_ID = re.compile(r"^(?P<array>[0-9]+)_(?P<index>[0-9]+)$")
_PENDING_TASKS = re.compile(r"^(?P<array>[0-9]+)_\[(?P<indices>[0-9,\-]+)(?:%[0-9]+)?\]$")
_RANGES = re.compile(r"^[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*$")


@dataclass(frozen=True)
class ArrayTask:
    """One job of an array: its spec and the tag of its own attempt."""

    spec: JobSpec
    tag: str


def shape(spec: JobSpec) -> tuple[object, ...]:
    """What the tasks of one array must share: everything sbatch is told (the rest, command,
    work dir, environment and name, is each task's own, in its own script)."""
    return (spec.time_limit_minutes, spec.memory_mb, spec.cpus, spec.partition, tuple(spec.extra_options))


def task_id(array_id: str, index: int) -> str:
    return f"{array_id}_{index}"


def split_task_id(job_id: str) -> tuple[str, int] | None:
    """("123", 4) for "123_4"; None for a plain job id."""
    match = _TASK_ID.fullmatch(job_id)
    return (match["array"], int(match["index"])) if match else None


def is_task_id(job_id: str) -> bool:
    return split_task_id(job_id) is not None


def parse_indices(text: str) -> list[int]:
    """The indices of "1-3,7" (Slurm's range string) or "0xE" (slurmrestd's hex bitmap)."""
    text = text.strip().split("%", 1)[0]
    if text.lower().startswith("0x"):
        bits = int(text, 16)
        return [index for index in range(bits.bit_length()) if bits >> index & 1]
    if not _RANGES.fullmatch(text):
        raise ValueError(f"unreadable array task list {text!r}")
    indices: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices


def expand_task_ids(job_id: str) -> list[str]:
    """The job ids one record stands for: itself, or each pending task of "123_[4-6%2]"."""
    match = _PENDING_TASKS.fullmatch(job_id)
    if match is None:
        return [job_id]
    return [task_id(match["array"], index) for index in parse_indices(match["indices"])]


def array_script(manifest: Path) -> str:
    """The array's job script: run this task's own script, its output in this task's own log."""
    return "\n".join(
        [
            "#!/bin/bash",
            "set -euo pipefail",
            f"mapfile -d '' -t entries < {shlex.quote(str(manifest))}",
            'index="$SLURM_ARRAY_TASK_ID"',
            'if (( 2 * index + 1 >= ${#entries[@]} )); then echo "no task $index in the manifest" >&2; exit 64; fi',
            'script="${entries[2 * index]}"',
            'log="${entries[2 * index + 1]}.${SLURM_ARRAY_JOB_ID}_${index}.log"',
            'exec >"$log" 2>&1',
            'exec /bin/bash -- "$script"',
            "",
        ]
    )


def log_prefix(spec: JobSpec, tag: str) -> str:
    """A task's log without the Slurm id (the script adds ".<array>_<index>.log"), as files.log_path names it."""
    return str(Path(spec.work_dir, JOB_FILES_DIR, tag))


def write_array_files(tasks: Sequence[ArrayTask], array_tag: str, files_dir: str) -> Path:
    """Each task's script in its own work dir, then the array's manifest, its tags (index order) and
    its script in `files_dir`; the array's script path. Every file is written whole, then renamed."""
    validate_tag(array_tag)
    if not tasks:
        raise ValueError("an array needs at least one task")
    if len(tasks) > MAX_ARRAY_TASKS + 1:
        raise ValueError(f"an array holds at most {MAX_ARRAY_TASKS + 1} tasks, got {len(tasks)}")
    shapes = {shape(task.spec) for task in tasks}
    if len(shapes) != 1:
        raise ValueError("the tasks of one array must ask for the same resources and options")
    directory = Path(files_dir)
    if not directory.is_absolute():
        raise ValueError(f"an array's files dir must be an absolute path, got {files_dir!r}")
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for task in tasks:
        validate_tag(task.tag)
        script = write_script(task.spec, task.tag, ".sbatch")
        entries += [str(script), log_prefix(task.spec, task.tag)]
    manifest = directory / MANIFEST
    _write_whole(manifest, "".join(entry + "\0" for entry in entries))
    _write_whole(directory / TAGS, "".join(task.tag + "\n" for task in tasks))
    script_path = directory / f"{array_tag}.sbatch"
    _write_whole(script_path, array_script(manifest), mode=0o700)
    return script_path


def read_tags(files_dir: str) -> list[str]:
    """The tags of an array's tasks, in index order (what write_array_files wrote)."""
    return Path(files_dir, TAGS).read_text(encoding="utf-8").split()


def _write_whole(path: Path, text: str, mode: int = 0o600) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def array_range(count: int, max_running: int | None) -> str:
    """sbatch's --array value: every index, with "%N" when fewer than all may run at once."""
    if count < 1:
        raise ValueError("an array needs at least one task")
    if max_running is not None and max_running < 1:
        raise ValueError(f"an array's running cap must be positive, got {max_running!r}")
    indices = f"0-{count - 1}"
    return f"{indices}%{max_running}" if max_running is not None and max_running < count else indices


def pending_in_accounting(statuses: dict[str, JobStatus]) -> list[str]:
    """The array tasks accounting reads as pending: it keeps a task cancelled while pending in its
    array's pending record (measured on 22.05), so the controller is asked (confirm_pending)."""
    return [job_id for job_id, status in statuses.items() if status.state is JobState.PENDING and is_task_id(job_id)]


def confirm_pending(
    accounted: JobStatus, controller: dict[str, list[JobStatus]], record: JobStatus | None
) -> JobStatus:
    """A task accounting reads as pending, as the controller has it: its own record there, or, if
    the controller lists other tasks of its array but not this one, CANCELLED (a pending task leaves
    its array's pending tasks only by starting, when it gets a record of its own, or by being
    cancelled). If the controller lists none of the array, accounting's answer stands."""
    if record is not None:
        return record
    array = accounted.job_id.partition("_")[0]
    if not any(job_id.partition("_")[0] == array and is_task_id(job_id) for job_id in controller):
        return accounted
    return replace(accounted, state=JobState.CANCELLED, raw_state="CANCELLED", exit_code=None, signal=None)
