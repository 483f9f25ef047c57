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
from pathlib import Path

from . import logs
from .arrays import (
    ARRAY_NAME,
    ArrayTask,
    array_range,
    confirm_pending,
    pending_in_accounting,
    split_task_id,
    task_id,
    write_array_files,
)
from .cluster import (
    ClusterError,
    JobStatus,
    PartitionLimits,
    SubmissionRejected,
    SubmittedJob,
    job_comment,
    newest_first,
    tag_from_comment,
)
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
from .usage import USAGE_FIELDS, JobUsage, parse_usage

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


# sbatch's reasons (Slurm's error strings) that no retry of the same job can change. Anything else
# (a socket timeout, an unreachable or busy controller, a submit-count limit) may pass.
PERMANENT_SBATCH_ERRORS = (
    "invalid partition",
    "invalid account",
    "invalid qos",
    "invalid wckey",
    "invalid feature specification",
    "invalid generic resource",
    "invalid trackable resource",
    "invalid node name",
    "requested node configuration is not available",
    "requested partition configuration not available",
    "requested time limit is invalid",
    "memory specification can not be satisfied",
    "more processors requested than permitted",
    "node count specification invalid",
    "access/permission denied",
    "user's group not permitted",
    "job violates accounting/qos policy",
    "requested reservation is invalid",
    "invalid job array specification",
    "unrecognized option",
    "invalid option",
)
# The one QOS refusal that lifts by itself: too many of our jobs are queued right now.
_SUBMIT_LIMIT = "job submit limit"


def is_permanent_sbatch_error(stderr: str) -> bool:
    """Whether sbatch's refusal is for good (the job can never be queued as it is)."""
    text = stderr.lower()
    if _SUBMIT_LIMIT in text:
        return False
    return any(reason in text for reason in PERMANENT_SBATCH_ERRORS)


def job_name(tag: str, spec_name: str) -> str:
    """The Slurm job name: the tag first, so a lookup can select the job by name."""
    return safe_job_name(f"{tag} {spec_name}")


def _sinfo_memory(value: str) -> int | None:
    """sinfo's %m: the smallest node's memory in MB ("65536", or "1000+" for mixed nodes)."""
    value = value.strip().rstrip("+")
    return int(value) if value.isdigit() else None


def _sinfo_minutes(value: str) -> int | None:
    """sinfo's %l: "infinite", "minutes", "hours:minutes:seconds" or "days-hours:minutes:seconds"."""
    value = value.strip()
    if not value or value in ("infinite", "UNLIMITED", "n/a"):
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(part) for part in clock.split(":") if part.isdigit()]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0]  # minutes:seconds
    elif len(parts) == 3:
        minutes = parts[0] * 60 + parts[1]
    else:
        return None
    return minutes + (int(days) * 24 * 60 if days.isdigit() else 0)


def _lines_of(output: str, tag: str) -> str:
    """The lines of an answer that carry this tag: another job's odd line (a state we cannot
    read) must not break the lookup of ours."""
    comment = job_comment(tag)
    return "\n".join(line for line in output.splitlines() if line.endswith("|" + comment))


def check_job_id(job_id: str) -> str:
    """A job's id ("123") or an array task's ("123_4"); anything else is refused."""
    if not isinstance(job_id, str) or not (job_id.isdigit() or split_task_id(job_id) is not None):
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    return job_id


def selection_ids(job_ids: Sequence[str]) -> list[str]:
    """The ids to select these jobs by: an array task by its array ("123" for "123_4"), whose every
    task (the pending ones too, as one record) one selection returns; each id once, in order."""
    return list(dict.fromkeys(split[0] if (split := split_task_id(j)) else j for j in job_ids))


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def placeholder(job: SubmittedJob, state: JobState) -> JobStatus:
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


class Pacer:
    """Keeps calls at least `min_interval_s` apart (a site's rule for how often we may ask)."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._last: float | None = None

    def wait(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            wait = self.min_interval_s - (now - self._last)
            if wait > 0:
                time.sleep(wait)
                now = time.monotonic()
        self._last = now


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
        self._pacer = Pacer(min_query_interval_s)
        self.accounting_grace = timedelta(seconds=accounting_grace_s)
        self.command_timeout_s = command_timeout_s
        self.find_window = find_window
        self.calls: Counter[str] = Counter()

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
        submit_time = datetime.now(UTC)
        job_id = self._sbatch(spec, tag, spec.name, spec.work_dir, output, script, [])
        return SubmittedJob(job_id, submit_time, log_path(spec.work_dir, tag, job_id))

    supports_arrays = True

    def submit_array(
        self, tasks: Sequence[ArrayTask], *, array_tag: str, files_dir: str, max_running: int | None = None
    ) -> list[SubmittedJob]:
        """One sbatch for all `tasks` (one shape: arrays.shape), as the array `--array=0-(n-1)[%max_running]`
        tagged `array_tag`; each task's record, in order, its id "<array>_<index>" and its own log."""
        validate_tag(array_tag)
        script = write_array_files(tasks, array_tag, files_dir)
        # What the array script prints before it has opened the task's own log (nothing, unless it fails).
        output = str(Path(files_dir.replace("%", "%%"), "%a.log"))
        shared = tasks[0].spec
        submit_time = datetime.now(UTC)
        array_id = self._sbatch(
            shared,
            array_tag,
            ARRAY_NAME,
            files_dir,
            output,
            script,
            [f"--array={array_range(len(tasks), max_running)}"],
        )
        return [
            SubmittedJob(
                task_id(array_id, index), submit_time, log_path(task.spec.work_dir, task.tag, task_id(array_id, index))
            )
            for index, task in enumerate(tasks)
        ]

    def _sbatch(
        self, spec: JobSpec, tag: str, name: str, work_dir: str, output: str, script: Path, own: list[str]
    ) -> str:
        argv = [
            "sbatch",
            "--parsable",
            "--export=NONE",
            f"--job-name={job_name(tag, name)}",
            f"--comment={job_comment(tag)}",
            # The reconciler owns retries: a job Slurm requeued itself would run again under one attempt.
            "--no-requeue",
            f"--chdir={work_dir}",
            f"--output={output}",
            f"--error={output}",
            f"--time={spec.time_limit_minutes}",
            f"--mem={spec.memory_mb}M",
            f"--cpus-per-task={spec.cpus}",
            *own,
        ]
        if spec.partition:
            argv.append(f"--partition={spec.partition}")
        argv += [*spec.extra_options, str(script)]
        try:
            answer = self._run(argv)
        except ClusterError as error:
            if is_permanent_sbatch_error(str(error)):
                raise SubmissionRejected(str(error)) from error
            raise
        return parse_sbatch_output(answer)

    def query(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobStatus]:
        wanted = {check_job_id(j.job_id): j for j in jobs}
        if not wanted:
            return {}
        self._pacer.wait()
        now = datetime.now(UTC)
        # Clamped: sacct refuses a window starting in the future (a submitter's clock ahead).
        since = min(min(j.submit_time for j in wanted.values()) - CLOCK_SKEW, now)
        accounted = group_by_id(
            record
            for chunk in chunks(selection_ids(list(wanted)), MAX_IDS_PER_CALL)
            for record in self._sacct(["-S", _slurm_time(since), "-E", "now", "-j", ",".join(chunk)])
        )
        result: dict[str, JobStatus] = {}
        overdue: list[SubmittedJob] = []
        for job_id, job in wanted.items():
            record = pick_record(accounted.get(job_id, ()), job.submit_time)
            if record is not None:
                result[job_id] = record
            elif now - job.submit_time < self.accounting_grace:
                result[job_id] = placeholder(job, JobState.SUBMITTED)
            else:
                overdue.append(job)
        pending_tasks = pending_in_accounting(result)
        if overdue or pending_tasks:
            asked = [j.job_id for j in overdue] + pending_tasks
            queued = group_by_id(self._squeue(["-j", ",".join(selection_ids(asked))]))
            for job in overdue:
                record = pick_record(queued.get(job.job_id, ()), job.submit_time)
                result[job.job_id] = record or placeholder(job, JobState.LOST)
            for job_id in pending_tasks:
                record = pick_record(queued.get(job_id, ()), wanted[job_id].submit_time)
                result[job_id] = confirm_pending(result[job_id], queued, record)
        return result

    def find_by_tag(self, tag: str, *, spec_name: str | None = None, since: datetime | None = None) -> list[JobStatus]:
        """Our jobs carrying this tag, newest first.

        With the spec's name, both commands select by job name (which starts with the tag), so
        the answer holds this job only; `since` (the claim's time) bounds the accounting window.
        A line of another job that cannot be read never spoils the lookup.
        """
        validate_tag(tag)
        start = (since - CLOCK_SKEW) if since is not None else datetime.now(UTC) - self.find_window
        selection = [f"--name={job_name(tag, spec_name)}"] if spec_name is not None else []
        accounted = self._sacct(
            ["-S", _slurm_time(min(start, datetime.now(UTC))), "-E", "now", *selection], only_tag=tag
        )
        # squeue adds what slurmdbd has not recorded yet.
        found = {r.job_id: r for r in self._squeue(["--me", *selection], only_tag=tag) if r.tag == tag}
        found.update({r.job_id: r for r in accounted if r.tag == tag})
        return newest_first(found.values())

    def usage(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobUsage]:
        """What these ended jobs used (CPU time, peak memory, wall time) and asked for, from sacct:
        one call per MAX_IDS_PER_CALL jobs, over the window since the earliest submission (Slurm
        reuses ids). A job accounting has not recorded yet is left out."""
        if not jobs:
            return {}
        ids = selection_ids([check_job_id(job.job_id) for job in jobs])
        since = min(min(job.submit_time for job in jobs) - CLOCK_SKEW, datetime.now(UTC))
        found: dict[str, JobUsage] = {}
        for chunk in chunks(ids, MAX_IDS_PER_CALL):
            output = self._run(
                [
                    "sacct",
                    "--parsable2",
                    "--noheader",
                    "-o",
                    ",".join(USAGE_FIELDS),
                    "-S",
                    _slurm_time(since),
                    "-E",
                    "now",
                    "-j",
                    ",".join(chunk),
                ]
            )
            found.update(parse_usage(output))
        return found

    def cancel(self, job_id: str) -> None:
        self._run(
            ["scancel", check_job_id(job_id)],
            harmless_errors=("Invalid job id", "already completing or completed"),
        )

    def count_active(self) -> int:
        # --array: one line per array task, pending ones included, so each task counts once.
        output = self._run(["squeue", "--noheader", "--all", "--me", "--array", "-o", "%T|%k"])
        active = (JobState.PENDING, JobState.RUNNING)
        count = 0
        for line in output.splitlines():
            raw_state, _, comment = line.partition("|")
            if tag_from_comment(comment) is not None and map_slurm_state(raw_state) in active:
                count += 1
        return count

    def active_jobs(self) -> list[JobStatus]:
        """Our tagged jobs Slurm holds pending, running or suspended; lines it cannot read are left out."""
        output = self._run(
            [
                "squeue",
                "--noheader",
                "--all",
                "--me",
                "-t",
                "PENDING,RUNNING,SUSPENDED,CONFIGURING",
                "-o",
                SQUEUE_FORMAT,
            ]
        )
        found = []
        for line in output.splitlines():
            try:
                found.extend(parse_squeue(line))
            except ValueError:
                continue
        return [record for record in found if record.tag is not None and not record.state.is_final]

    def partition_limits(self) -> dict[str | None, PartitionLimits]:
        """Per partition (None: the default one), its time limit and its nodes' memory, from one sinfo."""
        output = self._run(["sinfo", "--noheader", "-o", "%P|%l|%m"])
        limits: dict[str | None, PartitionLimits] = {}
        for line in output.splitlines():
            name, _, rest = line.partition("|")
            time_limit, _, memory = rest.partition("|")
            partition = PartitionLimits(
                max_memory_mb=_sinfo_memory(memory), max_time_minutes=_sinfo_minutes(time_limit)
            )
            limits[name.rstrip("*")] = partition
            if name.endswith("*"):
                limits[None] = partition
        return limits

    def tail_log(self, path: str, lines: int = 50) -> str:
        return logs.tail_log(path, lines)

    def _sacct(self, selection: list[str], only_tag: str | None = None) -> list[JobStatus]:
        argv = ["sacct", "--parsable2", "--noheader", "-X", "-o", ",".join(SACCT_FIELDS)]
        output = self._run(argv + selection)
        return parse_sacct(_lines_of(output, only_tag) if only_tag else output)

    def _squeue(self, selection: list[str], only_tag: str | None = None) -> list[JobStatus]:
        # --all includes hidden partitions; -t all includes jobs that ended recently.
        argv = ["squeue", "--noheader", "--all", "-t", "all", "-o", SQUEUE_FORMAT]
        # A single unknown id makes squeue fail instead of printing nothing.
        output = self._run(argv + selection, harmless_errors=("Invalid job id",))
        return parse_squeue(_lines_of(output, only_tag) if only_tag else output)
