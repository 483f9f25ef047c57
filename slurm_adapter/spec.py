"""What to run: the job specification, its validation, and the job script built from it."""

from __future__ import annotations

import re
import shlex
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The PATH a job gets unless its environment names one: jobs never inherit the
# submitter's environment, and bash needs a PATH to find anything.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MAX_JOB_NAME = 100
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_TAG = re.compile(r"^[a-z0-9-]{1,64}$")
# '|' would break sacct/squeue parsable output; control characters (newlines
# included) break line-oriented output and terminals.
_NAME_UNSAFE = re.compile(r"[|\x00-\x1f\x7f]+")

# sbatch options a spec may add; every other one could change what runs, where
# it writes, or whose environment it gets.
VALUE_OPTIONS = frozenset({"--qos", "--account", "--constraint", "--gres", "--nice", "--reservation"})
# No --requeue: jobs are submitted with --no-requeue, because the reconciler owns retries (a job Slurm
# requeued behind our back would run twice under one attempt).
FLAG_OPTIONS = frozenset({"--hold", "--nice"})


def safe_job_name(name: str) -> str:
    cleaned = _NAME_UNSAFE.sub(" ", name).strip()
    return cleaned[:MAX_JOB_NAME] or "job"


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"tag must match [a-z0-9-]{{1,64}}, got {tag!r}")
    return tag


def _validate_extra_option(option: str) -> None:
    name, eq, value = option.partition("=")
    if eq:
        allowed = name in VALUE_OPTIONS and value != "" and not _NAME_UNSAFE.search(value)
    else:
        allowed = name in FLAG_OPTIONS
    if not allowed:
        raise ValueError(
            f"sbatch option {option!r} is not allowed; allowed: "
            f"{', '.join(sorted(o + '=...' for o in VALUE_OPTIONS))}, {', '.join(sorted(FLAG_OPTIONS))}"
        )


@dataclass(frozen=True)
class JobSpec:
    name: str
    command: tuple[str, ...]
    work_dir: str
    time_limit_minutes: int = 60
    memory_mb: int = 1024
    cpus: int = 1
    partition: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    extra_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted (as from JSON) and frozen so that the spec is immutable.
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "extra_options", tuple(self.extra_options))
        object.__setattr__(self, "environment", types.MappingProxyType(dict(self.environment)))

        if not isinstance(self.name, str):
            raise ValueError("name must be a string")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ValueError("command must be a non-empty sequence of strings")
        if any("\x00" in a for a in self.command):
            raise ValueError("command arguments must not contain NUL")
        if not isinstance(self.work_dir, str) or not self.work_dir.startswith("/"):
            raise ValueError(f"work_dir must be an absolute path, got {self.work_dir!r}")
        for attr in ("time_limit_minutes", "memory_mb", "cpus"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{attr} must be a positive integer, got {value!r}")
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.partition):
            raise ValueError(f"invalid partition name {self.partition!r}")
        for key, value in self.environment.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise ValueError(f"environment name {key!r} must match ^[A-Z_][A-Z0-9_]*$")
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"environment value of {key} must be a string without NUL")
        for option in self.extra_options:
            _validate_extra_option(option)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": list(self.command),
            "work_dir": self.work_dir,
            "time_limit_minutes": self.time_limit_minutes,
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "partition": self.partition,
            "environment": dict(self.environment),
            "extra_options": list(self.extra_options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown JobSpec fields: {sorted(unknown)}")
        return cls(**d)


def build_script(spec: JobSpec) -> str:
    """The bash job script: every value reaches bash shell-quoted, never pasted."""
    exports = {"PATH": DEFAULT_PATH, **spec.environment}
    lines = [
        "#!/bin/bash",
        "set -euo pipefail",
        f"cd -- {shlex.quote(spec.work_dir)}",
        *(f"export {name}={shlex.quote(value)}" for name, value in exports.items()),
        shlex.join(spec.command),
        "",
    ]
    return "\n".join(lines)
