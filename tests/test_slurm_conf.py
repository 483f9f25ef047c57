"""One slurm.conf: this machine's cluster (scripts/slurm-up.sh) and the compose service's
(docker/slurm-entrypoint.sh) render the same template, slurm/slurm.conf.in, and cannot drift.

Each script's own rendering code is run here, cut out of the script, into a temporary directory:
no Slurm daemon is touched.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "slurm"
RENDER = TEMPLATES / "render.sh"
SLURM_UP = ROOT / "scripts" / "slurm-up.sh"
ENTRYPOINT = ROOT / "docker" / "slurm-entrypoint.sh"
CONF_KEYS = re.compile(r"^(ClusterName|SlurmctldHost|NodeName|PartitionName|StorageLoc|DbdHost)=", re.MULTILINE)


def render(template: str, *pairs: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RENDER), str(TEMPLATES / template), *pairs], capture_output=True, text=True, timeout=30
    )


def between(path: Path, start: str, end: str) -> str:
    text = path.read_text()
    return text[text.index(start) : text.index(end)]


def slurm_up_configuration(tmp_path: Path) -> dict[str, str]:
    """slurm-up.sh's render functions, run on its defaults (the cgroup v1 tracking)."""
    functions = between(SLURM_UP, 'TEMPLATES="$(cd', "changed=0\n").replace(
        '"$(cd "$(dirname "$0")/../slurm" && pwd)"', f'"{TEMPLATES}"'
    )
    script = (
        "set -euo pipefail\nCLUSTER=emg STATE_DIR=/var/lib/emg-slurm LOG_DIR=/var/log/emg-slurm "
        "RUN_DIR=/run/emg-slurm CPUS=64 MEM_MB=65536 DB_HOST=127.0.0.1 DB_PORT=3306\n"
        "JWT_CONF=$'AuthAltTypes=auth/jwt\\nAuthAltParameters=jwt_key=/var/lib/emg-slurm/jwt_hs256.key'\n"
        "TRACKING=$'ProctrackType=proctrack/cgroup\\nTaskPlugin=task/cgroup'\n"
        f"{functions}\nrender_slurm_conf >{tmp_path}/up-slurm.conf\nrender_slurmdbd_conf >{tmp_path}/up-slurmdbd.conf\n"
    )
    subprocess.run(["bash", "-c", script], check=True, timeout=30)
    return {name: (tmp_path / f"up-{name}").read_text() for name in ("slurm.conf", "slurmdbd.conf")}


def container_configuration(tmp_path: Path) -> dict[str, str]:
    """The entrypoint's configuration section, run as the compose service runs it (host "slurm")."""
    section = between(ENTRYPOINT, "# --- configuration", "# Published atomically")
    conf_dir = tmp_path / "etc-slurm"
    conf_dir.mkdir()
    script = (
        f"set -euo pipefail\nCLUSTER=emg HOST=slurm CPUS=8 MEM_MB=16384 STATE_DIR=/var/lib/emg-slurm "
        f"LOG_DIR=/var/log/emg-slurm RUN_DIR=/run/emg-slurm CONF_DIR={conf_dir} TEMPLATES={TEMPLATES}\n{section}"
    )
    subprocess.run(["bash", "-c", script], check=True, timeout=30)
    return {name: (conf_dir / name).read_text() for name in ("slurm.conf", "slurmdbd.conf")}


def settings_of(text: str) -> dict[str, list[str]]:
    """Each setting's values, comments dropped; NodeName/PartitionName lines keyed by their name."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            if key in {"NodeName", "PartitionName"}:
                key = f"{key}={value.split()[0]}"
            found.setdefault(key, []).append(value)
    return found


def test_both_scripts_write_the_same_settings_from_the_one_template(tmp_path):
    up = slurm_up_configuration(tmp_path)
    container = container_configuration(tmp_path)
    for name in ("slurm.conf", "slurmdbd.conf"):
        assert "@" not in up[name] and "@" not in container[name]
        # The same settings in both; only host names, sizes and process tracking differ.
        # JWT (for slurmrestd) only this machine's cluster serves.
        differ = {
            "NodeName=localhost",
            "NodeName=slurm",
            "ProctrackType",
            "TaskPlugin",
            "JobAcctGatherParams",
            "AuthAltTypes",
            "AuthAltParameters",
        }
        assert set(settings_of(up[name])) - differ == set(settings_of(container[name])) - differ, name
    assert "SlurmctldHost=localhost(127.0.0.1)" in up["slurm.conf"]
    assert "NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 RealMemory=65536" in up["slurm.conf"]
    assert "SlurmctldHost=slurm\n" in container["slurm.conf"]
    assert "NodeName=slurm NodeAddr=slurm CPUs=8 RealMemory=16384" in container["slurm.conf"]
    assert "ProctrackType=proctrack/linuxproc" in container["slurm.conf"]


@pytest.mark.parametrize("script", [SLURM_UP, ENTRYPOINT])
def test_no_script_carries_slurm_conf_text_of_its_own(script):
    assert "slurm.conf.in" in script.read_text()
    assert not CONF_KEYS.search(script.read_text()), f"{script.name} writes Slurm settings outside slurm/*.conf.in"


def test_a_placeholder_without_a_value_is_refused_by_name():
    result = render("slurmdbd.conf.in", "GENERATOR=test", "HOST=h", "RUN_DIR=/r", "LOG_DIR=/l", "DB_HOST=d")
    assert result.returncode != 0
    assert "no value given for @DB_PORT@" in result.stderr


def test_a_value_for_a_placeholder_the_template_lacks_is_refused():
    result = render("slurmdbd.conf.in", "NOT_THERE=1")
    assert result.returncode != 0 and "has no @NOT_THERE@" in result.stderr


def test_values_are_taken_literally_and_may_span_lines():
    result = render(
        "slurmdbd.conf.in",
        "GENERATOR=a & b",
        "HOST=h",
        "RUN_DIR=/r",
        "LOG_DIR=/l",
        "DB_HOST=x\ny",
        "DB_PORT=1",
        "EXTRA=",
    )
    assert result.returncode == 0, result.stderr
    assert "# Generated by a & b\n" in result.stdout and "StorageHost=x\ny\n" in result.stdout


def test_settings_of_one_caller_go_in_extra_and_an_empty_extra_leaves_no_line():
    common = ("GENERATOR=g", "HOST=h", "RUN_DIR=/r", "LOG_DIR=/l", "DB_HOST=d", "DB_PORT=1")
    empty = render("slurmdbd.conf.in", *common, "EXTRA=")
    added = render("slurmdbd.conf.in", *common, "EXTRA=AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key=/k")
    assert empty.stdout.endswith("StorageLoc=slurm_acct_db\n")
    assert added.stdout == empty.stdout + "AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key=/k\n"
