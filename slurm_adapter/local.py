"""A backend without Slurm: each job is a detached local process.

State lives in `<root_dir>/<job id>/` (job.json, pid, exit.json, cancelled), so
a restarted orchestrator finds its jobs again. There is no queue: a job starts
when submitted, so its start time is its submit time. Memory and CPU requests
are not enforced, partitions and extra sbatch options do not apply; the time
limit is enforced (TIMEOUT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from . import local_runner, logs
from .cluster import JobStatus, PartitionLimits, SubmittedJob, newest_first
from .files import log_path, write_script
from .spec import DEFAULT_PATH, JobSpec, validate_tag
from .states import JobState
from .usage import JobUsage

_ID_PREFIX = "local-"
_ID = re.compile(re.escape(_ID_PREFIX) + "[0-9a-f]{16}")


class LocalCluster:
    name = "local"
    # No scheduler, so nothing to save by one submission: the reconciler submits each job singly.
    supports_arrays = False

    def __init__(self, root_dir: str) -> None:
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        # Always empty: kept so callers can count scheduler commands on any backend.
        self.calls: Counter[str] = Counter()

    def submit(self, spec: JobSpec, tag: str) -> SubmittedJob:
        validate_tag(tag)
        job_id = _ID_PREFIX + uuid.uuid4().hex[:16]
        state_dir = self.root / job_id
        state_dir.mkdir()
        script = write_script(spec, tag, ".sh")
        submitted = SubmittedJob(job_id, datetime.now(UTC), log_path(spec.work_dir, tag, job_id))
        (state_dir / "job.json").write_text(
            json.dumps(
                {
                    "job_id": job_id,
                    "tag": tag,
                    "name": spec.name,
                    "script": str(script),
                    "work_dir": spec.work_dir,
                    "log_path": submitted.log_path,
                    "time_limit_minutes": spec.time_limit_minutes,
                    "submit_time": submitted.submit_time.timestamp(),
                }
            )
        )
        with open(state_dir / "runner.err", "wb") as runner_err:
            runner = subprocess.Popen(
                [sys.executable, "-I", local_runner.__file__, str(state_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=runner_err,
                env={"PATH": DEFAULT_PATH},
                start_new_session=True,
            )
        (state_dir / "pid").write_text(f"{runner.pid} {_process_identity(runner.pid)}")
        return submitted

    def query(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobStatus]:
        return {job.job_id: self._status(self._state_dir(job.job_id), job.job_id) for job in jobs}

    def find_by_tag(self, tag: str, *, spec_name: str | None = None, since: datetime | None = None) -> list[JobStatus]:
        """Every job is on this machine's disk, so neither the name nor the window is needed."""
        validate_tag(tag)
        return newest_first(self._status(d, d.name) for d, job in self._jobs() if job["tag"] == tag)

    def usage(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobUsage]:
        """Local processes keep no accounting: no usage is known."""
        return {}

    def cancel(self, job_id: str) -> None:
        state_dir = self._state_dir(job_id)
        if not (state_dir / "job.json").exists() or (state_dir / "exit.json").exists():
            return
        (state_dir / "cancelled").touch()
        pid = _live_runner(state_dir)
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def active_jobs(self) -> list[JobStatus]:
        return [status for d, _ in self._jobs() if not (status := self._status(d, d.name)).state.is_final]

    def partition_limits(self) -> dict[str | None, PartitionLimits]:
        """Local processes have no partitions: only the policy caps escalation."""
        return {}

    def count_active(self) -> int:
        return sum(1 for d, _ in self._jobs() if self._status(d, d.name).state is JobState.RUNNING)

    def tail_log(self, path: str, lines: int = 50) -> str:
        return logs.tail_log(path, lines)

    def _state_dir(self, job_id: str) -> Path:
        # The id becomes a path: anything but our own ids could point elsewhere.
        if not _ID.fullmatch(job_id):
            raise ValueError(f"not a local job id: {job_id!r}")
        return self.root / job_id

    def _jobs(self) -> Iterator[tuple[Path, dict[str, object]]]:
        for job_file in self.root.glob(f"{_ID_PREFIX}*/job.json"):
            try:
                yield job_file.parent, json.loads(job_file.read_text())
            except (OSError, ValueError):
                continue

    def _status(self, state_dir: Path, job_id: str) -> JobStatus:
        try:
            job = json.loads((state_dir / "job.json").read_text())
        except (OSError, ValueError):
            return _status(job_id, JobState.LOST)
        submit_time = datetime.fromtimestamp(job["submit_time"], UTC)
        # Liveness first: the runner writes exit.json before it exits, so a
        # runner found dead here has either left exit.json or was really lost.
        alive = _live_runner(state_dir) is not None
        try:
            end = json.loads((state_dir / "exit.json").read_text())
        except FileNotFoundError:
            if alive:
                state = JobState.RUNNING
            else:
                # Cancelled before the runner could guard itself against SIGTERM.
                state = JobState.CANCELLED if (state_dir / "cancelled").exists() else JobState.LOST
            return _status(
                job_id,
                state,
                submit_time=submit_time,
                start_time=submit_time if alive else None,
                tag=job["tag"],
            )
        if end["timed_out"]:
            state = JobState.TIMEOUT
        elif end["signal"] is not None:
            state = JobState.CANCELLED if (state_dir / "cancelled").exists() else JobState.FAILED
        else:
            state = JobState.COMPLETED if end["exit_code"] == 0 else JobState.FAILED
        return _status(
            job_id,
            state,
            exit_code=end["exit_code"],
            signal=end["signal"],
            submit_time=submit_time,
            start_time=submit_time,
            end_time=datetime.fromtimestamp(end["end_time"], UTC),
            tag=job["tag"],
        )


def _status(
    job_id: str,
    state: JobState,
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    submit_time: datetime | None = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    tag: str | None = None,
) -> JobStatus:
    # Local states are ours, not Slurm's: raw_state just echoes them.
    return JobStatus(
        job_id=job_id,
        state=state,
        raw_state="" if state is JobState.LOST else state.value,
        exit_code=exit_code,
        signal=signal,
        submit_time=submit_time,
        start_time=start_time,
        end_time=end_time,
        tag=tag,
    )


def _process_identity(pid: int) -> str | None:
    """The start time of a live (non-zombie) process, which tells it apart from a later one reusing its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: state is the 1st, starttime the 20th.
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _live_runner(state_dir: Path) -> int | None:
    """The pid of the job's runner if it is still alive."""
    try:
        pid, identity = (state_dir / "pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid) if _process_identity(int(pid)) == identity else None
