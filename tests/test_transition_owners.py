"""Each entity's state changes in one module: nothing else in the product writes those columns.

Read from the source with `ast`, so a new blind `QuerySet.update(state=...)`, a `bulk_update` of a
status or an attribute assignment like `job.state = ...` anywhere else fails here, naming the line.
"""

import ast
from pathlib import Path

import pytest

from emg.models import (
    TRANSITION_OWNED_CHILD_FIELDS,
    TRANSITION_OWNED_JOB_FIELDS,
    TRANSITION_OWNED_REQUEST_FIELDS,
    TRANSITION_OWNED_TENDED_FIELDS,
    TRANSITION_OWNED_WAIT_FIELDS,
)

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("emg", "flows", "workers", "slurm_adapter")
# The owners of the columns, and the model code that routes saves around them.
OWNERS = {"emg/jobs.py", "emg/requests.py", "emg/waits.py", "emg/children.py", "emg/tended_runs.py", "emg/history.py"}
# A write through the model's manager is checked against all of that model's owned columns.
MODEL_FIELDS = {
    "ClusterJob": TRANSITION_OWNED_JOB_FIELDS,
    "AnalysisRequest": TRANSITION_OWNED_REQUEST_FIELDS,
    "JobWait": TRANSITION_OWNED_WAIT_FIELDS,
    "ChildRun": TRANSITION_OWNED_CHILD_FIELDS,
    "TendedRun": TRANSITION_OWNED_TENDED_FIELDS,
}
# A write through a queryset in a variable (or an assignment to an attribute) cannot be traced to
# its model here; these names belong to no other model or dict of ours, so they are refused anywhere.
# (`history`: every model that has one has it owned, by the module that changes that model's state.)
DISTINCTIVE = frozenset(
    {
        "history",
        "state",
        "attempts",
        "retries",
        "submission_started_at",
        "slurm_job_id",
        "next_submit_at",
        "unreadable_state",
        "flow_reruns",
        "cancel_requested_at",
        "released_at",
        "suspensions",
        "child_flow_run_id",
        "claimed_at",
        "array_tag",
        "array_index",
        "reruns",
    }
)
ASSIGNED = DISTINCTIVE | {"status", "generation", "flow_run_id"}
WRITE_METHODS = {"update", "bulk_update", "update_or_create", "get_or_create", "create"}


def product_files():
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "/migrations/" in relative or relative in OWNERS:
                continue
            yield relative, path


def chain_root(node: ast.AST) -> str | None:
    """`ClusterJob` for `ClusterJob.objects.filter(...).update`, None for `rows.update`."""
    while isinstance(node, (ast.Attribute, ast.Call)):
        node = node.value if isinstance(node, ast.Attribute) else node.func
    return node.id if isinstance(node, ast.Name) else None


def writes_of(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_METHODS:
            root = chain_root(node.func.value)
            if node.func.attr in ("create", "get_or_create") and root in MODEL_FIELDS:
                continue  # creating a row (its first state) is not a transition
            guarded = MODEL_FIELDS.get(root, DISTINCTIVE)
            keywords = {keyword.arg for keyword in node.keywords if keyword.arg}
            if (
                node.func.attr == "bulk_update"
                and len(node.args) > 1
                and isinstance(node.args[1], (ast.List, ast.Tuple))
            ):
                keywords |= {element.value for element in node.args[1].elts if isinstance(element, ast.Constant)}
            for defaults in (keyword.value for keyword in node.keywords if keyword.arg == "defaults"):
                if isinstance(defaults, ast.Dict):
                    keywords |= {key.value for key in defaults.keys if isinstance(key, ast.Constant)}
            found += [(node.lineno, f".{node.func.attr}({name}=...)") for name in sorted(keywords & guarded)]
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr in ASSIGNED
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")
            ):
                found.append((node.lineno, f"assignment to .{target.attr}"))
    return found


def test_no_product_module_but_the_owners_writes_a_state_column():
    offences = [
        f"{relative}:{line}: {what}"
        for relative, path in product_files()
        for line, what in writes_of(ast.parse(path.read_text()))
    ]
    assert offences == []


@pytest.mark.parametrize(
    "source",
    [
        "ClusterJob.objects.filter(id=1).update(state='FAILED')",
        "AnalysisRequest.objects.filter(id=1).update(status='CANCELLED', finished_at=now)",
        "ClusterJob.objects.bulk_update(jobs, ['attempts'])",
        "rows.update(submission_started_at=None)",
        "AnalysisRequest.objects.update_or_create(id=1, defaults={'status': 'x'})",
        "job.slurm_job_id = '42'",
        "JobWait.objects.filter(id=1).update(released_at=None)",
        "JobWait.objects.filter(id=1).update(history=[])",
        "waits.update(suspensions=F('suspensions') + 1)",
        "rows.update(history=AppendToHistory(entry))",
        "wait.history = []",
        "ChildRun.objects.filter(id=1).update(state='CANCELLED')",
        "ChildRun.objects.filter(id=1).update(outcome='x', ended_at=now)",
        "rows.update(child_flow_run_id=run_id)",
        "child.claimed_at = now",
        "ChildRun.objects.bulk_update(rows, ['released_at'])",
    ],
)
def test_the_check_catches_each_kind_of_write(source):
    assert writes_of(ast.parse(source)) != []


@pytest.mark.parametrize(
    "source",
    [
        "Study.objects.filter(id=1).update(title='x')",
        "job.trace = {}",
        "row.update(status='COMPLETED', exit=0)",
        "OutboxEvent.objects.get_or_create(trigger=t, run_key=k, defaults={'parameters': p})",
        "ReconcileTick.objects.filter(id=1).update(finished_at=now)",
        "ClusterJob.objects.create(name=n, state='DECLARED')",
        "ChildRun.objects.filter(id=1).update(parameters={})",
    ],
)
def test_the_check_leaves_other_models_and_dicts_alone(source):
    assert writes_of(ast.parse(source)) == []
