from __future__ import annotations

import json

import pytest

from slurm_adapter import JobSpec, safe_job_name
from slurm_adapter.spec import build_script


def make(**overrides) -> JobSpec:
    fields = {"name": "n", "command": ("echo", "hi"), "work_dir": "/tmp/w"}
    fields.update(overrides)
    return JobSpec(**fields)


def test_round_trip_through_json() -> None:
    spec = make(
        partition="datamover",
        environment={"FOO": "bar baz"},
        extra_options=("--qos=normal", "--hold"),
        cpus=2,
        memory_mb=2048,
        time_limit_minutes=5,
    )
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.command == ("echo", "hi")


@pytest.mark.parametrize(
    "overrides",
    [
        {"command": ()},
        {"work_dir": "relative/dir"},
        {"cpus": 0},
        {"memory_mb": -1},
        {"time_limit_minutes": True},
        {"environment": {"lower": "x"}},
        {"environment": {"1ABC": "x"}},
        {"environment": {"A-B": "x"}},
        {"extra_options": ("--output=/etc/passwd",)},
        {"extra_options": ("--export=ALL",)},
        {"extra_options": ("--wrap=rm -rf /",)},
        {"extra_options": ("--qos",)},
        {"extra_options": ("--qos=a\nb",)},
        # Our own --no-requeue: a job Slurm requeued itself would run twice under one attempt.
        {"extra_options": ("--requeue",)},
        {"extra_options": ("--no-requeue",)},
        {"partition": "debug;rm"},
    ],
)
def test_invalid_specs_are_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError):
        make(**overrides)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown"):
        JobSpec.from_dict({**make().to_dict(), "shell": "zsh"})


def test_spec_is_immutable() -> None:
    spec = make(environment={"A": "1"})
    with pytest.raises(TypeError):
        spec.environment["A"] = "2"  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", "plain"),
        ("a|b", "a b"),
        ("line\nbreak\r\x1b[31m", "line break [31m"),
        ("|||", "job"),
        ("x" * 500, "x" * 100),
    ],
)
def test_safe_job_name(name: str, expected: str) -> None:
    assert safe_job_name(name) == expected


def test_script_quotes_everything() -> None:
    script = build_script(
        make(command=("printf", "%s\n", "$(touch x)", "a; b"), work_dir="/tmp/a dir", environment={"V": "'q' $HOME"})
    )
    assert script.startswith("#!/bin/bash\nset -euo pipefail\ncd -- '/tmp/a dir'\n")
    assert "export V=''\"'\"'q'\"'\"' $HOME'" in script
    assert script.rstrip().endswith("printf '%s\n' '$(touch x)' 'a; b'")
