"""Where a job's script and log live: `<work_dir>/.emg/`, beside its outputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .spec import JobSpec, build_script

JOB_FILES_DIR = ".emg"


def log_path(work_dir: str, tag: str, job_id: str) -> str:
    """The job's combined stdout/stderr file."""
    return str(Path(work_dir, JOB_FILES_DIR, f"{tag}.{job_id}.log"))


def write_script(spec: JobSpec, tag: str, suffix: str) -> Path:
    """Writes the job script (creating the work dir) atomically, so a reader never sees half of it."""
    directory = Path(spec.work_dir, JOB_FILES_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{tag}{suffix}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{tag}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(build_script(spec))
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
