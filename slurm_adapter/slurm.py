"""The real backend: Slurm's command-line tools, run with argument lists and timeouts.

Submit times come from our own clock just before sbatch, not from Slurm: asking
the controller would cost one more command per job. Matching accounting records
tolerates the skew (see status.pick_record).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

from . import logs
from .cluster import ClusterError, JobStatus, SubmittedJob, job_comment, newest_first, tag_from_comment
from .files import log_path, write_script
from .spec import JobSpec, safe_job_name, validate_tag
from .states import JobState, map_slurm_state
from .status import (
    CLOCK_SKEW,
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    group_by_id,
    parse_sacct,
    parse_squeue,
    pick_record,
)

# Stays well below ARG_MAX (ids are ~8 characters) while one call covers any realistic batch.
MAX_IDS_PER_CALL = 5000

# Variables the Slurm clients read as defaults (SBATCH_PARTITION, SQUEUE_FORMAT,
# SLURM_TIME_FORMAT...) would silently change what we submit or how output looks.
_CLIENT_ENV_PREFIXES = ("SBATCH_", "SQUEUE_", "SACCT_", "SCANCEL_", "SLURM_")
_KEPT_ENV = frozenset({"SLURM_CONF"})


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV or not k.startswith(_CLIENT_ENV_PREFIXES)}
    # Every time Slurm prints or parses is then UTC, ISO 8601.
    env.update(TZ="UTC", SLURM_TIME_FORMAT="standard")
    return env


def _slurm_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_sbatch_output(output: str) -> str:
    """`sbatch --parsable` prints "<id>" or "<id>;<cluster>"."""
    job_id = output.strip().split(";", 1)[0]
    if not job_id.isdigit():
        raise ClusterError(f"unexpected sbatch output: {output.strip()!r}")
    return job_id


def _check_job_id(job_id: str) -> str:
    if not job_id.isdigit():
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    return job_id


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _placeholder(job: SubmittedJob, state: JobState) -> JobStatus:
    return JobStatus(
        job_id=job.job_id,
        state=state,
        raw_state="",
        exit_code=None,
        signal=None,
        submit_time=job.submit_time,
        start_time=None,
        end_time=None,
        tag=None,
    )


class SlurmCluster:
    name = "slurm"

    def __init__(
        self,
        *,
        min_query_interval_s: float = 0.0,
        accounting_grace_s: float = 60.0,
        command_timeout_s: float = 60.0,
        find_window: timedelta = timedelta(days=7),
    ) -> None:
        """
        min_query_interval_s: query() waits so that two calls are at least this far apart.
        accounting_grace_s: how long a job missing from sacct is SUBMITTED (slurmdbd lags)
            before squeue is asked, and then LOST if squeue does not know it either.
        find_window: how far back find_by_tag searches accounting.
        """
        self.min_query_interval_s = min_query_interval_s
        self.accounting_grace = timedelta(seconds=accounting_grace_s)
        self.command_timeout_s = command_timeout_s
        self.find_window = find_window
        self.calls: Counter[str] = Counter()
        self._last_query: float | None = None

    def _run(self, argv: list[str], harmless_errors: tuple[str, ...] = ()) -> str:
        self.calls[argv[0]] += 1
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.command_timeout_s,
                env=_client_env(),
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"{argv[0]} did not answer within {self.command_timeout_s}s") from e
        except OSError as e:
            raise ClusterError(f"cannot run {argv[0]}: {e}") from e
        if proc.returncode != 0:
            if any(msg in proc.stderr for msg in harmless_errors):
                return ""
            raise ClusterError(f"{argv[0]} exited with {proc.returncode}: {proc.stderr.strip()[:1000]}")
        return proc.stdout

    def submit(self, spec: JobSpec, tag: str) -> SubmittedJob:
        validate_tag(tag)
        script = write_script(spec, tag, ".sbatch")
        # sbatch expands %-patterns in --output; "%%" is a literal '%'.
        output = log_path(spec.work_dir.replace("%", "%%"), tag, "%j")
        argv = [
            "sbatch",
            "--parsable",
            "--export=NONE",
            f"--job-name={safe_job_name(f'{tag} {spec.name}')}",
            f"--comment={job_comment(tag)}",
            f"--chdir={spec.work_dir}",
            f"--output={output}",
            f"--error={output}",
            f"--time={spec.time_limit_minutes}",
            f"--mem={spec.memory_mb}M",
            f"--cpus-per-task={spec.cpus}",
        ]
        if spec.partition:
            argv.append(f"--partition={spec.partition}")
        argv += [*spec.extra_options, str(script)]
        submit_time = datetime.now(UTC)
        job_id = parse_sbatch_output(self._run(argv))
        return SubmittedJob(job_id, submit_time, log_path(spec.work_dir, tag, job_id))

    def query(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobStatus]:
        wanted = {_check_job_id(j.job_id): j for j in jobs}
        if not wanted:
            return {}
        self._respect_min_interval()
        now = datetime.now(UTC)
        # Clamped: sacct refuses a window starting in the future (a submitter's clock ahead).
        since = min(min(j.submit_time for j in wanted.values()) - CLOCK_SKEW, now)
        accounted = group_by_id(
            record
            for chunk in _chunks(list(wanted), MAX_IDS_PER_CALL)
            for record in self._sacct(["-S", _slurm_time(since), "-E", "now", "-j", ",".join(chunk)])
        )
        result: dict[str, JobStatus] = {}
        overdue: list[SubmittedJob] = []
        for job_id, job in wanted.items():
            record = pick_record(accounted.get(job_id, ()), job.submit_time)
            if record is not None:
                result[job_id] = record
            elif now - job.submit_time < self.accounting_grace:
                result[job_id] = _placeholder(job, JobState.SUBMITTED)
            else:
                overdue.append(job)
        if overdue:
            queued = group_by_id(self._squeue(["-j", ",".join(j.job_id for j in overdue)]))
            for job in overdue:
                record = pick_record(queued.get(job.job_id, ()), job.submit_time)
                result[job.job_id] = record or _placeholder(job, JobState.LOST)
        return result

    def find_by_tag(self, tag: str) -> list[JobStatus]:
        validate_tag(tag)
        since = datetime.now(UTC) - self.find_window
        accounted = self._sacct(["-S", _slurm_time(since), "-E", "now"])
        # squeue adds what slurmdbd has not recorded yet.
        found = {r.job_id: r for r in self._squeue(["--me"]) if r.tag == tag}
        found.update({r.job_id: r for r in accounted if r.tag == tag})
        return newest_first(found.values())

    def cancel(self, job_id: str) -> None:
        self._run(
            ["scancel", _check_job_id(job_id)],
            harmless_errors=("Invalid job id", "already completing or completed"),
        )

    def count_active(self) -> int:
        output = self._run(["squeue", "--noheader", "--all", "--me", "-o", "%T|%k"])
        active = (JobState.PENDING, JobState.RUNNING)
        count = 0
        for line in output.splitlines():
            raw_state, _, comment = line.partition("|")
            if tag_from_comment(comment) is not None and map_slurm_state(raw_state) in active:
                count += 1
        return count

    def tail_log(self, path: str, lines: int = 50) -> str:
        return logs.tail_log(path, lines)

    def _sacct(self, selection: list[str]) -> list[JobStatus]:
        argv = ["sacct", "--parsable2", "--noheader", "-X", "-o", ",".join(SACCT_FIELDS)]
        return parse_sacct(self._run(argv + selection))

    def _squeue(self, selection: list[str]) -> list[JobStatus]:
        # --all includes hidden partitions; -t all includes jobs that ended recently.
        argv = ["squeue", "--noheader", "--all", "-t", "all", "-o", SQUEUE_FORMAT]
        # A single unknown id makes squeue fail instead of printing nothing.
        return parse_squeue(self._run(argv + selection, harmless_errors=("Invalid job id",)))

    def _respect_min_interval(self) -> None:
        now = time.monotonic()
        if self._last_query is not None:
            wait = self.min_query_interval_s - (now - self._last_query)
            if wait > 0:
                time.sleep(wait)
                now = time.monotonic()
        self._last_query = now
