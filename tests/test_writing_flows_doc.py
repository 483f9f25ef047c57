"""The examples of docs/writing-flows.md are real code: every `python` block compiles, and the
`python runnable` blocks run, in order, in one namespace, each `test_*` they define run as a test
(on this session's PostgreSQL and Prefect server)."""

import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-flows.md"
FENCE = re.compile(r"^```python( runnable)?\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[int, bool, str]]:
    """(line the code starts on, runnable, code) of each python block."""
    text = DOC.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, bool(match.group(1)), match.group(2))
        for match in FENCE.finditer(text)
    ]


def test_the_doc_has_runnable_examples_of_each_kind():
    runnable = [code for _, is_runnable, code in blocks() if is_runnable]
    assert len(runnable) >= 4
    joined = "\n".join(runnable)
    for name in ("cache_key_fn", "run_cluster_jobs", "run_child_flows", "ResubmitPolicy(", "def test_"):
        assert name in joined, name


@pytest.mark.parametrize(
    ("line", "code"), [(line, code) for line, _, code in blocks()], ids=[f"line-{line}" for line, _, _ in blocks()]
)
def test_every_example_compiles(line, code):
    compile(code, f"{DOC}:{line}", "exec")


@pytest.mark.django_db(transaction=True)
def test_the_runnable_examples_run_and_their_tests_pass(prefect_api_url, settings, tmp_path):
    namespace: dict = {"__name__": "writing_flows_doc"}
    for line, runnable, code in blocks():
        if runnable:
            # Padded with newlines, so a traceback names the doc's own line.
            exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_") and callable(value)]
    assert tests, "the doc's runnable examples define no test"
    fixtures = {"settings": settings, "tmp_path": tmp_path}
    for test in tests:
        test(**{parameter: fixtures[parameter] for parameter in inspect.signature(test).parameters})
