"""The REST backend: slurmrestd with a JWT, for an orchestrator that does not run on a login node.

It keeps the CLI backend's guarantees with the CLI backend's own code (tag and comment, job
name, option and environment validation, the job script, the state table, record matching):
only the transport differs. Requests per call, on the API versions rest_api.py describes:

- query(): one GET of accounting (/slurmdb/<v>/jobs filtered by job id, sacct's counterpart)
  for every awaited job. One more GET of the controller's jobs (/slurm/<v>/jobs, squeue's
  counterpart) only when a job is missing from accounting past the grace period, or, on
  v0.0.36-v0.0.38 whose accounting reports every exit code as 0, when one ended unsuccessfully.
  /jobs/state (v0.0.40+) is not used: it carries no exit code, times or comment, so a job that
  ended would cost a second request anyway.
- find_by_tag(): accounting and the controller, one GET each (sacct and squeue).
- cancel(): one DELETE. count_active(), active_jobs(): one GET. partition_limits(): two.

Errors are ClusterError, never the token: it is sent in a header and appears in no message.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from math import ceil
from pathlib import Path
from typing import Any

import httpx

from . import logs
from .arrays import (
    ARRAY_NAME,
    ArrayTask,
    array_range,
    confirm_pending,
    expand_task_ids,
    pending_in_accounting,
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
)
from .files import log_path, write_script
from .rest_api import SUPPORTED_VERSIONS, Dialect, check_version
from .slurm import Pacer, check_job_id, chunks, is_permanent_sbatch_error, job_name, placeholder, selection_ids
from .spec import JobSpec, validate_tag
from .states import JobState
from .status import CLOCK_SKEW, group_by_id, pick_record

# Ids per accounting request: a 2000-id URL is ~18 kB, which 22.05's slurmrestd takes (3000 tried).
MAX_IDS_PER_REQUEST = 2000
# Status codes a proxy or a restarting slurmrestd answers with that may pass by themselves.
TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
# Slurm's errors (errors[].error) that no retry changes for cancel(): the job is gone or done.
_CANCEL_HARMLESS = ("Invalid job id specified", "already completing or completed")
# How 22.05 answers a refused token: slurmdbd's is unambiguous; slurmctld's is also what it says
# when it cannot load the controller's configuration at all.
_AUTH_ERRORS = ("Protocol authentication error", "Authentication failure")
_AUTH_OR_UNREACHABLE = ("slurmctld config is unable to load",)


class TokenSource:
    """The JWT, given directly or read from a file that is re-read whenever it changes (a token
    renewer rewrites it): a cheap stat per request, a read only on change."""

    def __init__(self, token: str | None = None, token_file: str | None = None) -> None:
        if bool(token) == bool(token_file):
            raise ValueError("slurmrestd needs exactly one of a token or a token file")
        self._token = _clean_token(token) if token else None
        self._file = Path(token_file) if token_file else None
        self._stamp: tuple[int, int, int] | None = None
        self.reads = 0

    def __repr__(self) -> str:  # never the token itself
        return f"TokenSource(file={str(self._file)!r})" if self._file else "TokenSource(token=***)"

    def get(self) -> str:
        if self._file is None:
            assert self._token is not None
            return self._token
        try:
            stat = self._file.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp or self._token is None:
                self._token = _clean_token(self._file.read_text(encoding="utf-8"))
                self._stamp = stamp
                self.reads += 1
        except OSError as e:
            raise ClusterError(f"cannot read the slurmrestd token file {self._file}: {e.strerror}") from e
        if not self._token:
            raise ClusterError(f"the slurmrestd token file {self._file} is empty")
        return self._token

    def checked(self) -> str:
        """The token, unless it has expired by its own "exp" claim: 22.05's slurmctld refuses an
        expired token with an unspecified error, so we say it first."""
        token = self.get()
        expires = _expiry(token)
        if expires is not None and expires <= datetime.now(UTC):
            source = f"token file {self._file}" if self._file else "token"
            raise ClusterError(f"the slurmrestd {source} expired at {expires.isoformat()}: renew it")
        return token


def _expiry(token: str) -> datetime | None:
    """A JWT's "exp" (read, not verified: slurmctld verifies), or None if it has none we can read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (ValueError, KeyError, TypeError, OverflowError):
        return None


def _clean_token(text: str) -> str:
    """A token as `scontrol token` prints it ("SLURM_JWT=...") or bare."""
    token = text.strip()
    return token.removeprefix("SLURM_JWT=").strip()


def _since_param(since: datetime, now: datetime) -> str:
    """A start time relative to slurmrestd's own clock and time zone ("now-N minutes"): an absolute
    time would be read in the server's local time zone, which we do not know."""
    minutes = max(0, ceil((now - since).total_seconds() / 60))
    return f"now-{minutes}minutes"


def _kind(method: str, path: str) -> str:
    """What calls counts: the endpoint without version or job id ("GET /slurmdb/jobs")."""
    return f"{method} {re.sub(r'/[0-9]+(_[0-9]+)?$', '/{id}', re.sub(r'/v0[.]0[.][0-9]+', '', path))}"


# slurmrestd 22.05 answers a job query that matches nothing with this "error".
_NOTHING_FOUND = 9003


# Slurm's own errors (errors[].error) that pass by themselves: a busy or restarting slurmctld/slurmdbd.
_TRANSIENT_SLURM_ERRORS = (
    "Socket timed out",
    "Unable to contact slurm controller",
    "Connection refused",
    "Resource temporarily unavailable",
    "Slurm backup controller in standby mode",
    "Unable to connect to database",
)


def _transient_slurm_error(body: Any) -> bool:
    return any(marker in error for error in _slurm_errors(body) for marker in _TRANSIENT_SLURM_ERRORS)


def _slurm_errors(body: Any) -> list[str]:
    """slurmrestd's errors[] as text ("Invalid partition name specified (2000)"), less "nothing found"."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    texts = []
    for error in body["errors"]:
        if isinstance(error, dict):
            code = error.get("error_number", error.get("error_code"))
            if code == _NOTHING_FOUND:
                continue
            words = [str(error.get(k)) for k in ("error", "description") if error.get(k)]
            texts.append(f"{': '.join(dict.fromkeys(words)) or 'error'} ({code})")
    return texts


class RestCluster:
    name = "slurmrestd"

    def __init__(
        self,
        *,
        url: str,
        user: str,
        token: str | None = None,
        token_file: str | None = None,
        api_version: str = "auto",
        timeout_s: float = 30.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        min_query_interval_s: float = 0.0,
        accounting_grace_s: float = 60.0,
        find_window: timedelta = timedelta(days=7),
    ) -> None:
        """
        url: slurmrestd's base URL (http://host:6820). user: the user the token is for; jobs run as it.
        api_version: one of rest_api.SUPPORTED_VERSIONS, or "auto": the newest that /openapi/v3 lists.
        retries: how often a transient failure (no connection, a timeout, 502/503/504/429) is retried
            before the call fails; a submission is retried only when the connection never opened.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"slurmrestd URL must be http(s)://..., got {url!r}")
        if not user or not isinstance(user, str):
            raise ValueError("slurmrestd needs the user name the token is for")
        if api_version != "auto":
            check_version(api_version)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.url = url.rstrip("/")
        self.user = user
        self.token = TokenSource(token, token_file)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.accounting_grace = timedelta(seconds=accounting_grace_s)
        self.find_window = find_window
        self.calls: Counter[str] = Counter()
        self._requested_version = api_version
        self._dialect: Dialect | None = None
        self._pacer = Pacer(min_query_interval_s)
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    def __repr__(self) -> str:
        return f"RestCluster(url={self.url!r}, user={self.user!r}, api_version={self._requested_version!r})"

    def close(self) -> None:
        self._http.close()

    # --- HTTP -----------------------------------------------------------------------------------
    @property
    def dialect(self) -> Dialect:
        if self._dialect is None:
            version = self._requested_version
            if version == "auto":
                version = self.discover_version()
            self._dialect = Dialect(version)
        return self._dialect

    @property
    def version(self) -> str:
        return self.dialect.version

    def discover_version(self) -> str:
        """The newest version we support of which slurmrestd serves both the controller and accounting."""
        spec = self._request("GET", "/openapi/v3")
        paths = spec.get("paths") if isinstance(spec, dict) else None
        if not isinstance(paths, dict):
            raise ClusterError("slurmrestd's /openapi/v3 lists no paths")
        served = [
            v
            for v in SUPPORTED_VERSIONS
            if any(p.startswith(f"/slurm/{v}/job/submit") for p in paths)
            and any(p.startswith(f"/slurmdb/{v}/jobs") for p in paths)
        ]
        if not served:
            raise ClusterError(
                f"slurmrestd serves none of the API versions supported ({', '.join(SUPPORTED_VERSIONS)})"
            )
        return served[-1]

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        idempotent: bool = True,
    ) -> Any:
        """One call, retried on transient failures only; the decoded body, or ClusterError."""
        kind = _kind(method, path)
        attempt = 0
        while True:
            self.calls[kind] += 1
            headers = {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self.token.checked()}
            try:
                response = self._http.request(method, path, params=params, json=json, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                failure = f"cannot connect to slurmrestd at {self.url}: {type(e).__name__}"
                retry = True
            except httpx.TransportError as e:
                # The request may have been carried out: only an idempotent one is sent again.
                failure = f"slurmrestd {method} {path} failed: {type(e).__name__}"
                retry = idempotent
            else:
                body = self._decode(response)
                if response.status_code in TRANSIENT_STATUS or (
                    response.status_code >= 500 and (body is None or _transient_slurm_error(body))
                ):
                    failure = f"slurmrestd {method} {path} answered {response.status_code}"
                    retry = idempotent
                else:
                    return self._checked(method, path, response.status_code, body)
            if not retry or attempt >= self.retries:
                raise ClusterError(failure)
            attempt += 1
            time.sleep(self.retry_backoff_s * attempt)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            return None

    def _checked(self, method: str, path: str, status: int, body: Any) -> Any:
        errors = _slurm_errors(body)
        where = f"slurmrestd {method} {path}"
        if status == 401 or any(marker in e for e in errors for marker in _AUTH_ERRORS):
            raise ClusterError(
                f"{where}: the token was refused (expired, or not for user {self.user}?): {'; '.join(errors) or status}"
            )
        if any(marker in e for e in errors for marker in _AUTH_OR_UNREACHABLE):
            raise ClusterError(f"{where}: the token was refused, or slurmctld is unreachable: {'; '.join(errors)}")
        # 22.05 lists "Job is in held state" as an error of a submission that succeeded.
        if errors and not (status == 200 and method == "POST" and isinstance(body, dict) and body.get("job_id")):
            raise ClusterError(f"{where} answered {status}: {'; '.join(errors)}"[:1000])
        if status >= 400 or not isinstance(body, dict):
            raise ClusterError(f"{where} answered {status} without a readable body")
        return body

    # --- the Cluster protocol ------------------------------------------------------------------
    def submit(self, spec: JobSpec, tag: str) -> SubmittedJob:
        """One POST. The job is never requeued by Slurm (the reconciler owns retries): `requeue: false`,
        and on v0.0.36-v0.0.38, which ignore that, `no_requeue: true` (see rest_api)."""
        validate_tag(tag)
        dialect = self.dialect
        script_path = write_script(spec, tag, ".sbatch")
        # %-patterns are expanded in the output path as by sbatch; "%%" is a literal '%'.
        output = log_path(spec.work_dir.replace("%", "%%"), tag, "%j")
        body = dialect.submission(
            spec,
            script_path.read_text(encoding="utf-8"),
            name=job_name(tag, spec.name),
            comment=job_comment(tag),
            output=output,
        )
        submit_time = datetime.now(UTC)
        job_id = self._post_job(body)
        return SubmittedJob(job_id, submit_time, log_path(spec.work_dir, tag, job_id))

    supports_arrays = True

    def submit_array(
        self, tasks: Sequence[ArrayTask], *, array_tag: str, files_dir: str, max_running: int | None = None
    ) -> list[SubmittedJob]:
        """One POST for all `tasks`, as the CLI backend's submit_array: each task's record, in order."""
        validate_tag(array_tag)
        dialect = self.dialect
        script_path = write_array_files(tasks, array_tag, files_dir)
        output = str(Path(files_dir.replace("%", "%%"), "%a.log"))
        body = dialect.submission(
            tasks[0].spec,
            script_path.read_text(encoding="utf-8"),
            name=job_name(array_tag, ARRAY_NAME),
            comment=job_comment(array_tag),
            output=output,
            work_dir=files_dir,
            array=array_range(len(tasks), max_running),
        )
        submit_time = datetime.now(UTC)
        array_id = self._post_job(body)
        return [
            SubmittedJob(
                task_id(array_id, index), submit_time, log_path(task.spec.work_dir, task.tag, task_id(array_id, index))
            )
            for index, task in enumerate(tasks)
        ]

    def _post_job(self, body: dict[str, Any]) -> str:
        try:
            answer = self._request("POST", f"/slurm/{self.dialect.version}/job/submit", json=body, idempotent=False)
        except ClusterError as error:
            if is_permanent_sbatch_error(str(error)):
                raise SubmissionRejected(str(error)) from error
            raise
        job_id = answer.get("job_id")
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise ClusterError(f"slurmrestd's submission answer has no job id: {sorted(answer)}")
        return str(job_id)

    def query(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobStatus]:
        wanted = {check_job_id(j.job_id): j for j in jobs}
        if not wanted:
            return {}
        self._pacer.wait()
        now = datetime.now(UTC)
        since = min(min(j.submit_time for j in wanted.values()) - CLOCK_SKEW, now)
        accounted = group_by_id(
            record
            for chunk in chunks(selection_ids(list(wanted)), MAX_IDS_PER_REQUEST)
            for record in self._accounting({"step": ",".join(chunk), "start_time": _since_param(since, now)})
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
        unsure_exit = [r for r in result.values() if r.state.is_final and r.exit_code is None and r.raw_state]
        pending_tasks = pending_in_accounting(result)
        if overdue or unsure_exit or pending_tasks:
            controller = group_by_id(self._controller_jobs())
            for job_id in pending_tasks:
                record = pick_record(controller.get(job_id, ()), wanted[job_id].submit_time)
                result[job_id] = confirm_pending(result[job_id], controller, record)
            for job in overdue:
                record = pick_record(controller.get(job.job_id, ()), job.submit_time)
                result[job.job_id] = record or placeholder(job, JobState.LOST)
            for record in unsure_exit:
                known = pick_record(controller.get(record.job_id, ()), wanted[record.job_id].submit_time)
                if known is not None and known.state.is_final:
                    result[record.job_id] = replace(record, exit_code=known.exit_code, signal=known.signal)
        return result

    def find_by_tag(self, tag: str, *, spec_name: str | None = None, since: datetime | None = None) -> list[JobStatus]:
        """Our jobs carrying this tag, newest first; accounting selected by job name when the spec's
        name is given (unless it holds a comma, which the filter would split), the controller's list
        for what accounting has not recorded yet."""
        validate_tag(tag)
        now = datetime.now(UTC)
        start = (since - CLOCK_SKEW) if since is not None else now - self.find_window
        params = {"start_time": _since_param(min(start, now), now)}
        if spec_name is not None and "," not in (name := job_name(tag, spec_name)):
            params["job_name"] = name
        accounted = self._accounting(params, only_tag=tag)
        found = {r.job_id: r for r in self._controller_jobs(only_tag=tag)}
        found.update({r.job_id: r for r in accounted})
        return newest_first(found.values())

    def cancel(self, job_id: str) -> None:
        try:
            self._request("DELETE", f"/slurm/{self.version}/job/{check_job_id(job_id)}")
        except ClusterError as error:
            if not any(harmless in str(error) for harmless in _CANCEL_HARMLESS):
                raise

    def count_active(self) -> int:
        return sum(
            1
            for r in self._controller_jobs(mine=True)
            if r.tag is not None and r.state in (JobState.PENDING, JobState.RUNNING)
        )

    def active_jobs(self) -> list[JobStatus]:
        """Our tagged jobs Slurm holds pending, running or suspended; records it cannot read are left out."""
        return [
            r
            for r in self._controller_jobs(mine=True, skip_unreadable=True)
            if r.tag is not None and not r.state.is_final
        ]

    def partition_limits(self) -> dict[str | None, PartitionLimits]:
        version = self.version
        partitions = self._request("GET", f"/slurm/{version}/partitions").get("partitions") or []
        nodes = self._request("GET", f"/slurm/{version}/nodes").get("nodes") or []
        return self.dialect.partition_limits(partitions, nodes)

    def tail_log(self, path: str, lines: int = 50) -> str:
        return logs.tail_log(path, lines)

    def ping(self) -> None:
        """One GET of /ping: slurmrestd, our token and slurmctld behind it all answer, or ClusterError."""
        body = self._request("GET", f"/slurm/{self.version}/ping")
        pings = body.get("pings")
        if not isinstance(pings, list) or not pings:
            raise ClusterError("slurmrestd's ping names no slurmctld")

    # --- reading ----------------------------------------------------------------------------------
    def _accounting(self, params: Mapping[str, str], only_tag: str | None = None) -> list[JobStatus]:
        # Steps are not read, and are a quarter of 22.05's answer (sacct -X).
        body = self._request("GET", f"/slurmdb/{self.version}/jobs", params={**params, "skip_steps": "true"})
        return self._records(body.get("jobs", []), self.dialect.accounting_record, only_tag)

    def _controller_jobs(
        self, *, only_tag: str | None = None, mine: bool = False, skip_unreadable: bool = False
    ) -> list[JobStatus]:
        body = self._request("GET", f"/slurm/{self.version}/jobs")
        jobs = body.get("jobs")
        if mine and isinstance(jobs, list):
            jobs = [j for j in jobs if isinstance(j, dict) and j.get("user_name") == self.user]
        if only_tag is not None:
            return self._records(jobs, self.dialect.controller_record, only_tag)
        if skip_unreadable:
            found = []
            for job in jobs if isinstance(jobs, list) else ():
                try:
                    found.extend(self._records([job], self.dialect.controller_record, None))
                except ValueError:
                    continue
            return found
        return self._records(jobs, self.dialect.controller_record, None)

    @staticmethod
    def _records(jobs: Any, read: Any, only_tag: str | None) -> list[JobStatus]:
        """Reads every job; with a tag, only the jobs whose comment carries it, so another job's
        unreadable record (a state we do not know) never spoils the look-up of ours."""
        if not isinstance(jobs, list):
            raise ClusterError("slurmrestd's answer has no job list")
        if only_tag is not None:
            comment = job_comment(only_tag)
            jobs = [
                j
                for j in jobs
                if isinstance(j, dict)
                and comment
                in (
                    j.get("comment"),
                    (j.get("comment") or {}).get("job") if isinstance(j.get("comment"), dict) else None,
                )
            ]
        # An array's pending remainder is one record: one of its own for each of its tasks.
        return [
            replace(record, job_id=job_id) if job_id != record.job_id else record
            for record in (read(job) for job in jobs)
            for job_id in expand_task_ids(record.job_id)
        ]
