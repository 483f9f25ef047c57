"""What differs between slurmrestd's API versions: the request bodies we send and the records we read.

Two dialects cover what we support:

- v0.0.36-v0.0.38 (Slurm 21.08-22.05; Debian 12 ships 22.05): plain values, the environment a
  dictionary, the controller's exit code a raw wait status. Verified against the real 22.05 slurmrestd
  of the test cluster, where two defects shape the client: accounting's exit code is always 0
  (so the controller is asked for the exit code of a job that ended unsuccessfully), and
  `requeue: false` is ignored: its job description reads `no_requeue: true` instead (measured:
  Requeue=0 on the job, and `scontrol requeue` refused), which the submission sends as well.
- v0.0.40 and newer (Slurm 23.11+): numbers as {"set", "infinite", "number"}, states as lists of
  flags, the environment a list of "NAME=value". Written to SchedMD's published OpenAPI shapes;
  tests/slurm_adapter/data/rest_*.json hold those shapes.

v0.0.39 (Slurm 23.02 only) mixed the two and is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .arrays import parse_indices, task_id
from .cluster import JobStatus, PartitionLimits, tag_from_comment
from .spec import DEFAULT_PATH, JobSpec
from .states import JobState, map_slurm_state

OLD_VERSIONS = ("v0.0.36", "v0.0.37", "v0.0.38")
NEW_VERSIONS = ("v0.0.40", "v0.0.41", "v0.0.42", "v0.0.43", "v0.0.44")
SUPPORTED_VERSIONS = OLD_VERSIONS + NEW_VERSIONS

# The controller reports a job's state as a base state and flags; squeue prints the flag that
# matters most instead of the base state (src/common/slurm_protocol_defs.c, job_state_string).
# The same precedence, so a state reads as it does through the CLI backend.
_FLAG_PRECEDENCE = (
    "COMPLETING",
    "CONFIGURING",
    "RESIZING",
    "RESV_DEL_HOLD",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
    "REVOKED",
    "SIGNALING",
    "STAGE_OUT",
)

# How an option JobSpec allows (spec.VALUE_OPTIONS, spec.FLAG_OPTIONS) is spelled in a job description.
_VALUE_FIELDS = {
    "--qos": "qos",
    "--account": "account",
    "--constraint": "constraints",
    "--reservation": "reservation",
    "--nice": "nice",
}


def check_version(version: str) -> str:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported slurmrestd API version {version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def number(value: Any) -> int | None:
    """A plain integer, or v0.0.40's {"set", "infinite", "number"}; None when unset or infinite."""
    if isinstance(value, dict):
        if not value.get("set", False) or value.get("infinite", False):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def epoch(value: Any) -> datetime | None:
    seconds = number(value)
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def state_word(value: Any) -> str:
    """The state as squeue/sacct would print it: a string (v0.0.38) or a list of flags (v0.0.40+)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        flags = set(value[1:])
        for flag in _FLAG_PRECEDENCE:
            if flag in flags:
                return flag
        return str(value[0])
    raise ValueError(f"unreadable job state {value!r}")


def wait_status(value: Any) -> tuple[int | None, int | None]:
    """The controller's v0.0.38 exit code, a raw wait(2) status, as (exit code, signal or None)."""
    status = number(value)
    if status is None:
        return None, None
    if status & 0x7F:  # killed by a signal
        return 0, status & 0x7F
    return (status >> 8) & 0xFF, None


def exit_code_object(value: Any) -> tuple[int | None, int | None]:
    """v0.0.40's {"status": [...], "return_code": N, "signal": {"id": N}} as (exit code, signal or None)."""
    if not isinstance(value, dict):
        return None, None
    code = number(value.get("return_code"))
    signal = value.get("signal")
    signal_id = number(signal.get("id")) if isinstance(signal, dict) else None
    return code, signal_id or None


@dataclass(frozen=True)
class Dialect:
    version: str

    @property
    def new(self) -> bool:
        return self.version in NEW_VERSIONS

    # --- requests -------------------------------------------------------------------------
    def submission(
        self,
        spec: JobSpec,
        script: str,
        *,
        name: str,
        comment: str,
        output: str,
        work_dir: str | None = None,
        array: str | None = None,
    ) -> dict[str, Any]:
        """The body of POST /slurm/<version>/job/submit. The job's environment is PATH alone, as
        sbatch --export=NONE gives it: the script itself exports the spec's allowlist. `array`
        (sbatch's --array value) makes it a job array, run in `work_dir` (else the spec's)."""
        job: dict[str, Any] = {
            "name": name,
            "comment": comment,
            "requeue": False,
            "current_working_directory": work_dir or spec.work_dir,
            "standard_output": output,
            "standard_error": output,
            "cpus_per_task": spec.cpus,
        }
        if array is not None:
            job["array"] = array
        if not self.new:
            job["no_requeue"] = True  # 22.05 ignores requeue=false; this it honours (measured)
        if spec.partition:
            job["partition"] = spec.partition
        for option in spec.extra_options:
            flag, eq, value = option.partition("=")
            if not eq:
                job[{"--hold": "hold", "--nice": "nice"}[flag]] = True if flag == "--hold" else 100
            elif flag == "--gres":
                job["tres_per_node" if self.new else "gres"] = f"gres/{value}" if self.new else value
            elif flag == "--nice":
                job["nice"] = int(value)
            else:
                job[_VALUE_FIELDS[flag]] = value
        if self.new:
            job["environment"] = [f"PATH={DEFAULT_PATH}"]
            job["time_limit"] = {"set": True, "infinite": False, "number": spec.time_limit_minutes}
            job["memory_per_node"] = {"set": True, "infinite": False, "number": spec.memory_mb}
            if self.version == "v0.0.40":  # the script moved into the job description in v0.0.41
                return {"script": script, "job": job}
            job["script"] = script
            return {"job": job}
        job["environment"] = {"PATH": DEFAULT_PATH}
        job["time_limit"] = spec.time_limit_minutes
        job["memory_per_node"] = spec.memory_mb
        return {"script": script, "job": job}

    # --- records ----------------------------------------------------------------------------
    def accounting_record(self, job: Mapping[str, Any]) -> JobStatus:
        """One job of GET /slurmdb/<version>/jobs (sacct's counterpart)."""
        raw_state = state_word(_get(job, "state", "current"))
        state = map_slurm_state(raw_state)
        exit_code, signal = (None, None)
        if state.is_final:
            if self.new:
                exit_code, signal = exit_code_object(job.get("exit_code"))
            elif state is JobState.COMPLETED:
                exit_code, signal = 0, None
            # else: 22.05 reports 0 whatever the job exited with; RestCluster asks the controller.
        raw_times = job.get("time")
        times: Mapping[str, Any] = raw_times if isinstance(raw_times, dict) else {}
        comment = job.get("comment")
        raw_array = job.get("array")
        array: Mapping[str, Any] = raw_array if isinstance(raw_array, dict) else {}
        return JobStatus(
            job_id=_array_aware_id(job.get("job_id"), array.get("job_id"), array.get("task_id"), array.get("task")),
            state=state,
            raw_state=raw_state,
            exit_code=exit_code,
            signal=signal,
            submit_time=epoch(times.get("submission")),
            start_time=epoch(times.get("start")),
            end_time=epoch(times.get("end")),
            tag=tag_from_comment(comment.get("job") if isinstance(comment, dict) else None),
        )

    def controller_record(self, job: Mapping[str, Any]) -> JobStatus:
        """One job of GET /slurm/<version>/jobs (squeue's counterpart, with exit codes)."""
        raw_state = state_word(job.get("job_state"))
        state = map_slurm_state(raw_state)
        exit_code, signal = (None, None)
        if state.is_final:
            raw_exit = job.get("exit_code")
            exit_code, signal = exit_code_object(raw_exit) if isinstance(raw_exit, dict) else wait_status(raw_exit)
        comment = job.get("comment")
        return JobStatus(
            job_id=_array_aware_id(
                job.get("job_id"), job.get("array_job_id"), job.get("array_task_id"), job.get("array_task_string")
            ),
            state=state,
            raw_state=raw_state,
            exit_code=exit_code,
            signal=signal,
            submit_time=epoch(job.get("submit_time")),
            start_time=epoch(job.get("start_time")),
            end_time=epoch(job.get("end_time")),
            tag=tag_from_comment(comment if isinstance(comment, str) else None),
        )

    def partition_limits(
        self, partitions: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
    ) -> dict[str | None, PartitionLimits]:
        """As sinfo's %l and %m: the partition's time limit and its smallest node's memory."""
        memory: dict[str, int] = {}
        for node in nodes:
            real = number(node.get("real_memory"))
            for name in node.get("partitions") or ():
                if real is not None:
                    memory[name] = min(real, memory.get(name, real))
        limits: dict[str | None, PartitionLimits] = {}
        for partition in partitions:
            name = partition.get("name")
            if not isinstance(name, str):
                continue
            if self.new:
                minutes = number(_get(partition, "maximums", "time"))
                flags = _get(partition, "partition", "state") or []
                default = "DEFAULT" in (_get(partition, "flags") or []) or "DEFAULT" in flags
            else:
                minutes = number(partition.get("max_time_limit"))
                default = "default" in (partition.get("flags") or [])
            limit = PartitionLimits(
                max_memory_mb=memory.get(name),
                max_time_minutes=minutes if minutes is not None and minutes >= 0 else None,
            )
            limits[name] = limit
            if default:
                limits[None] = limit
        return limits


def _get(mapping: Mapping[str, Any], *keys: str) -> Any:
    value: Any = mapping
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _job_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ValueError(f"unreadable job id {value!r}")
    return str(value)


def _array_aware_id(raw_id: Any, array_id: Any, index: Any, pending: Any) -> str:
    """The id as sacct's JobID prints it: "123" for a job, "123_4" for an array task, and
    "123_[5,6,7]" for an array's pending remainder (its tasks as Slurm's range string or, in
    accounting, a hex bitmap such as "0xE"), which the reader expands into one record per task."""
    job_id = _job_id(raw_id)
    array = number(array_id)
    if not array:
        return job_id
    task = number(index)
    if task is not None:
        return task_id(str(array), task)
    if isinstance(pending, str) and pending:
        return f"{array}_[{','.join(str(i) for i in parse_indices(pending))}]"
    return job_id
