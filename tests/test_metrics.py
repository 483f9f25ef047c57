"""/metrics: who may read it, that its figures are the database's, and that the shipped alert rules
and dashboard name only metrics it serves."""

import json
import re
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.contrib.auth.models import User
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import wait_until
from emg.metrics import pending_and_run_times
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, OutboxEvent, ReconcileTick, Study
from tests.test_commands import declare, run

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "emg-dashboard.json"
TOKEN = "test-monitoring-token-" + uuid.uuid4().hex


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=headers or {"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def served_names(client) -> set[str]:
    """Every series name /metrics declares (from its TYPE lines: a family with no rows yet still counts)."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", response.content.decode(), flags=re.M):
        names |= {name} if kind != "histogram" else {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


@pytest.fixture(autouse=True)
def monitoring_token(settings):
    settings.EMG_MONITORING_TOKEN = TOKEN


def job(name: str, state: str, partition: str | None = None, **fields) -> ClusterJob:
    row = ClusterJob.objects.create(
        name=name, fingerprint=uuid.uuid4().hex, spec={"partition": partition}, state=state, **fields
    )
    return row


def at(minutes_ago: float) -> str:
    return (timezone.now() - timedelta(minutes=minutes_ago)).isoformat()


# --- who may read it ------------------------------------------------------------------------------


def test_metrics_refuse_anonymous_callers_non_staff_users_and_wrong_tokens(client):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    user = User.objects.create_user("visitor", password="pw-for-tests")
    client.force_login(user)
    assert client.get("/metrics").status_code == 401


def test_metrics_answer_staff_and_the_monitoring_token(client, admin_client):
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert admin_client.get("/metrics").status_code == 200


def test_with_no_token_set_a_bearer_of_nothing_is_refused(client, settings):
    settings.EMG_MONITORING_TOKEN = ""
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer"}).status_code == 401


# --- what it serves -------------------------------------------------------------------------------


def test_requests_jobs_and_outbox_figures_are_counts_of_the_rows(client):
    study = Study.objects.create(accession="PRJEB77701")
    requests = [AnalysisRequest.objects.create(study=study) for _ in range(4)]
    AnalysisRequest.objects.filter(id__in=[r.id for r in requests[:2]]).update(status="WAITING")
    AnalysisRequest.objects.filter(id=requests[2].id).update(status="FAILED")
    # Two of the four run events were dispatched, 2 s and 40 s after they were written.
    created = timezone.now() - timedelta(minutes=10)
    OutboxEvent.objects.update(created_at=created)
    OutboxEvent.objects.of(requests[0]).update(dispatched_at=created + timedelta(seconds=2))
    OutboxEvent.objects.of(requests[1]).update(dispatched_at=created + timedelta(seconds=40))

    job("a", ClusterJobState.RUNNING, "bigmem", slurm_job_id="11", submit_time=timezone.now())
    job(
        "b",
        ClusterJobState.RUNNING,
        None,
        slurm_job_id="12",
        submit_time=timezone.now(),
        unreadable_state="EXPEDITING",
        unreadable_since=timezone.now() - timedelta(hours=1),
    )
    job("c", ClusterJobState.PENDING, None, slurm_job_id="13", submit_time=timezone.now() - timedelta(hours=3))
    job("d", ClusterJobState.REJECTED, "nope", attempts=1, submit_error="invalid partition")
    job("e", ClusterJobState.DECLARED, None, attempts=1, retries=2, submit_error="Socket timed out")

    samples = scrape(client)

    assert value(samples, "emg_requests", status="WAITING") == 2
    assert value(samples, "emg_requests", status="FAILED") == 1
    assert value(samples, "emg_requests", status="PENDING") == 1
    assert value(samples, "emg_requests", status="COMPLETED") == 0
    assert value(samples, "emg_cluster_jobs", state="RUNNING", partition="bigmem") == 1
    assert value(samples, "emg_cluster_jobs", state="RUNNING", partition="default") == 1
    assert value(samples, "emg_cluster_jobs", state="REJECTED", partition="nope") == 1
    jobs_by_state = sum(v for (name, _), v in samples.items() if name == "emg_cluster_jobs")
    assert jobs_by_state == ClusterJob.objects.count() == 5
    assert value(samples, "emg_cluster_jobs_unreadable") == 1
    assert 3590 < value(samples, "emg_cluster_jobs_unreadable_oldest_age_seconds") < 3700
    assert 3 * 3600 - 10 < value(samples, "emg_cluster_jobs_oldest_pending_age_seconds") < 3 * 3600 + 100
    assert value(samples, "emg_submissions_rejected_total") == 1
    assert value(samples, "emg_cluster_job_retries_total") == 2
    assert value(samples, "emg_cluster_job_submissions_total") == 2
    assert value(samples, "emg_cluster_jobs_waiting_out_sbatch_errors") == 1
    assert value(samples, "emg_outbox_backlog") == 2
    assert 590 < value(samples, "emg_outbox_oldest_age_seconds") < 700
    assert value(samples, "emg_outbox_dispatch_latency_seconds_count") == 2
    assert value(samples, "emg_outbox_dispatch_latency_seconds_sum") == pytest.approx(42)
    assert value(samples, "emg_outbox_dispatch_latency_seconds_bucket", le="2.0") == 1
    assert value(samples, "emg_outbox_dispatch_latency_seconds_bucket", le="30.0") == 1
    assert value(samples, "emg_outbox_dispatch_latency_seconds_bucket", le="60.0") == 2


def test_pending_and_run_times_come_from_each_attempts_history(client):
    job(
        "retried",
        ClusterJobState.COMPLETED,
        slurm_job_id="21",
        submit_time=timezone.now(),
        history=[
            {"state": "CLAIMED", "detail": "attempt 1", "at": at(120)},
            {"state": "SUBMITTED", "detail": "sbatch -> 20", "at": at(120)},
            {"state": "RUNNING", "detail": "RUNNING", "at": at(110)},
            {"state": "OUT_OF_MEMORY", "detail": "OUT_OF_MEMORY (Slurm job 20)", "at": at(100)},
            {"state": "DECLARED", "detail": "more memory", "at": at(100)},
            {"state": "SUBMITTED", "detail": "sbatch -> 21", "at": at(99)},
            {"state": "RUNNING", "detail": "RUNNING", "at": at(39)},
            {"state": "COMPLETED", "detail": "COMPLETED exit 0:0", "at": at(9)},
        ],
    )
    # Seen submitted, then ended: never seen running, so in neither histogram.
    job(
        "quick",
        ClusterJobState.COMPLETED,
        slurm_job_id="22",
        submit_time=timezone.now(),
        history=[
            {"state": "SUBMITTED", "detail": "sbatch -> 22", "at": at(5)},
            {"state": "COMPLETED", "detail": "COMPLETED exit 0:0", "at": at(4)},
        ],
    )

    samples = scrape(client)

    assert value(samples, "emg_cluster_job_pending_seconds_count") == 2
    assert value(samples, "emg_cluster_job_pending_seconds_sum") == pytest.approx(600 + 3600, abs=1)
    assert value(samples, "emg_cluster_job_pending_seconds_bucket", le="900.0") == 1
    assert value(samples, "emg_cluster_job_run_seconds_count") == 2
    assert value(samples, "emg_cluster_job_run_seconds_sum") == pytest.approx(600 + 1800, abs=1)


def test_a_history_entry_that_cannot_be_read_is_skipped_not_a_failed_scrape():
    assert pending_and_run_times(
        [[{"state": "RUNNING"}, {"at": "yesterday", "state": "SUBMITTED"}, "junk"], "not a list", None]
    ) == ([], [])


def test_tick_figures_are_read_from_the_last_finished_tick(client):
    ReconcileTick.objects.all().delete()
    samples = scrape(client)
    assert value(samples, "emg_reconcile_last_tick_age_seconds") > 365 * 86400  # never ticked: alerts fire

    finished = timezone.now() - timedelta(seconds=30)
    ReconcileTick.objects.create(
        started_at=finished - timedelta(seconds=2),
        finished_at=finished,
        report={
            "duration_seconds": 1.5,
            "slurm_calls": {"sacct": 1, "sbatch": 3},
            "errors": ["one"],
            "totals": {"ticks": 40, "resumed": 7, "rerun": 2, "errors": 5, "slurm_calls": {"sacct": 40, "sbatch": 9}},
        },
    )
    ReconcileTick.objects.create(started_at=timezone.now(), report={})  # still running: not the last finished

    samples = scrape(client)

    assert 29 < value(samples, "emg_reconcile_last_tick_age_seconds") < 60
    assert value(samples, "emg_reconcile_last_tick_duration_seconds") == 1.5
    assert value(samples, "emg_reconcile_last_tick_slurm_calls", command="sbatch") == 3
    assert value(samples, "emg_reconcile_last_tick_errors") == 1
    assert value(samples, "emg_reconcile_ticks_total") == 40
    assert value(samples, "emg_flow_resumes_total") == 7
    assert value(samples, "emg_flow_reruns_total") == 2
    assert value(samples, "emg_reconcile_errors_total") == 5
    assert value(samples, "emg_slurm_calls_total", command="sacct") == 40


@pytest.mark.slurm
def test_real_ticks_record_their_slurm_calls_and_carry_totals_forward(client, slurm_cluster, tmp_path, settings):
    settings.EMG_CLUSTER_BACKEND = slurm_cluster
    ReconcileTick.objects.all().delete()
    submitted = declare(tmp_path, "metrics-tick")

    def tick() -> str:
        return wait_until(lambda: run("reconcile", "--once"), timeout=30, interval=0.2, message="a tick ran")

    try:
        tick()
        submitted.refresh_from_db()
        assert submitted.slurm_job_id
        tick()
    finally:
        subprocess.run(["scancel", submitted.slurm_job_id], check=False, timeout=30)

    first, second = ReconcileTick.objects.order_by("id")
    assert first.report["slurm_calls"].get("sbatch") == 1
    assert second.report["slurm_calls"].get("sacct", 0) >= 1  # the batched state query of the awaited job
    assert second.report["totals"]["ticks"] == 2
    assert second.report["totals"]["submitted"] == 1
    for command, n in second.report["totals"]["slurm_calls"].items():
        assert n == first.report["slurm_calls"].get(command, 0) + second.report["slurm_calls"].get(command, 0)

    samples = scrape(client)
    assert value(samples, "emg_reconcile_ticks_total") == 2
    assert value(samples, "emg_slurm_calls_total", command="sbatch") == 1
    assert value(samples, "emg_reconcile_last_tick_duration_seconds") == second.report["duration_seconds"] > 0


# --- the shipped alert rules and dashboard -------------------------------------------------------

# Names Prometheus makes itself, not /metrics.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "scalar",
    "max",
    "min",
    "avg",
    "count",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (`name=`), durations or quoted strings."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\(\s*[a-z_,\s]*\)\s*(?=\()", "", expr)  # by (le) (...)
    names = {
        match[1] for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*(.?))", expr) if match[2] != "("
    }
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_metric_names_are_read_off_promql():
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(emg_a_bucket{x="y"}[1h])))') == {"emg_a_bucket"}
    assert metric_names("emg_a > 2 * 86400 or emg_b > 100") == {"emg_a", "emg_b"}
    assert metric_names('up{job="emg"} == 0') == {"up"}


def test_the_alert_rules_cover_the_stall_backlog_unreadable_and_pending_cases():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"EmgReconcileTickStalled", "EmgOutboxBacklog", "EmgUnreadableJobs", "EmgJobsPendingTooLong"} <= set(rules)
    for rule in rules.values():
        assert rule["expr"] and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_alert_rules_and_dashboard_name_only_metrics_the_endpoint_serves(client):
    served = served_names(client)
    unknown = {}
    for where, expr in [(rule["alert"], rule["expr"]) for rule in alert_rules()] + [
        ("dashboard", expr) for expr in dashboard_expressions()
    ]:
        names = metric_names(expr)
        assert names, f"{where}: {expr!r} names no metric"
        missing = names - served - PROMETHEUS_OWN
        if missing:
            unknown[where] = sorted(missing)
    assert unknown == {}


def test_a_rule_naming_a_metric_that_is_not_served_is_caught(client):
    served = served_names(client)
    assert metric_names("emg_outbox_backlogg > 100") - served == {"emg_outbox_backlogg"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    # make install puts it there (Debian's prometheus package); the rules are checked, not skipped.
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_shipped_alert_rules_and_scrape_config():
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "--syntax-only", str(ALERTS.parent / "scrape.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_refuses_a_rule_whose_expression_does_not_parse(tmp_path):
    broken = yaml.safe_load(ALERTS.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum(emg_requests{status=}"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode != 0 and "parse error" in (checked.stdout + checked.stderr)
