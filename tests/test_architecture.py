"""The static checks bite: the import contracts hold on the real tree and fail on a planted
forbidden import, and every environment variable the product reads is in README's table.

No database, Redis or Prefect: these read files and run `lint-imports` in a subprocess.
"""

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("emg", "workers", "flows", "slurm_adapter")
DEV_PACKAGES = ("devstack", "tests", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_names() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    prefix = "importlinter:contract:"
    return {
        section.removeprefix(prefix): config[section]["name"]
        for section in config.sections()
        if section.startswith(prefix)
    }


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def copy_tree(destination: Path) -> None:
    """The Python files of every package the contracts name, and the contracts."""
    keep_python = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in (*PRODUCT_PACKAGES, *DEV_PACKAGES):
        shutil.copytree(ROOT / package, destination / package, ignore=keep_python)
    shutil.copy(ROOT / ".importlinter", destination / ".importlinter")


def test_import_contracts_hold_on_the_real_tree():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contract_names().values():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize(
    ("package", "planted", "contract"),
    [
        ("slurm_adapter", "import django\n", "slurm-adapter-standalone"),
        ("slurm_adapter", "from emg import models\n", "slurm-adapter-standalone"),
        ("emg", "import workers.dispatch\n", "emg-below-flows-and-workers"),
        ("workers", "import tests.settings\n", "product-not-tests"),
        ("emg", "from devstack.processes import wait_until\n", "product-not-tests"),
        ("flows", "import devstack.ena_fake\n", "product-not-tests"),
        ("devstack", "import tests.services\n", "devstack-not-tests"),
        ("flows", "import workers.reconciler\n", "layers"),
    ],
)
def test_a_planted_forbidden_import_breaks_its_contract(tmp_path, package, planted, contract):
    copy_tree(tmp_path)
    (tmp_path / package / "_planted.py").write_text(f'"""Planted by tests/test_architecture.py."""\n{planted}')
    result = lint_imports(tmp_path)
    name = contract_names()[contract]
    assert result.returncode != 0, result.stdout
    assert f"{name} BROKEN" in result.stdout, result.stdout
    assert f"{package}._planted" in result.stdout, result.stdout


# --- Configuration is documented ------------------------------------------------------------

CONFIG_PREFIXES = ("EMG_", "DJANGO_", "PREFECT_", "DATABASE_", "REDIS_", "CELERY_", "FLOWER_", "DEMO_")
CONFIG_NAMES = {"SECRET_KEY", "DEBUG"}


def _is_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _constant_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def environment_reads(source: str) -> set[str]:
    """Names read from the environment: os.environ[...], os.environ.get/setdefault/pop(...),
    os.getenv(...), `"NAME" in os.environ`, and settings' own _env_int/_env_float(...)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            name = _constant_str(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            reads = (
                (
                    isinstance(func, ast.Attribute)
                    and _is_environ(func.value)
                    and func.attr in {"get", "setdefault", "pop"}
                )
                or (
                    isinstance(func, ast.Attribute)
                    and func.attr == "getenv"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "os"
                )
                or (isinstance(func, ast.Name) and func.id.startswith("_env_"))
            )
            if reads:
                name = _constant_str(node.args[0])
        elif (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.In)
            and _is_environ(node.comparators[0])
        ):
            name = _constant_str(node.left)
        if name:
            names.add(name)
    return names


def configuration_variables() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    # devstack too: the demo's own variables (DEMO_*) are configuration people set.
    for package in (*PRODUCT_PACKAGES, "devstack"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in environment_reads(path.read_text()):
                if name.startswith(CONFIG_PREFIXES) or name in CONFIG_NAMES:
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def documented_variables() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def test_the_scanner_finds_every_kind_of_read():
    source = (
        "import os\n"
        "a = os.environ['EMG_A']\nb = os.environ.get('EMG_B', 1)\nos.environ.setdefault('EMG_C', 'x')\n"
        "d = os.getenv('EMG_D')\ne = 'EMG_E' in os.environ\nf = _env_int('EMG_F', 3)\n"
        "os.environ['EMG_G'] = 'written'\n"
    )
    assert environment_reads(source) == {"EMG_A", "EMG_B", "EMG_C", "EMG_D", "EMG_E", "EMG_F"}


def test_settings_reads_are_found():
    found = configuration_variables()
    # A sample of what emg/settings.py reads, so a scanner that finds nothing cannot pass.
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "DJANGO_SECRET_KEY",
        "EMG_WORK_DIR",
        "EMG_INSTANCE_NAMESPACE",
        "EMG_WORKER_ROLES",
        "DEMO_ONCE",
    ):
        assert name in found


def test_every_environment_variable_read_is_in_the_readme_table():
    missing = {
        name: sorted(paths) for name, paths in configuration_variables().items() if name not in documented_variables()
    }
    assert not missing, f"add these to README.md's configuration table (default and meaning): {missing}"
