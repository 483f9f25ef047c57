"""What /metrics serves to Prometheus: read from the database at scrape time.

The database is the record of what happened (the web process that answers a scrape runs no tick
and no flow), so every figure here is a query, not a counter kept in some process's memory: gauges
count rows as they are now, and counters are read off rows that only grow (jobs, events) or off
the running totals each reconcile tick carries over into its ReconcileTick row.

The pending-time and run-time histograms are built from the jobs' state histories, whose times
are when the reconciler saw the state change (a tick's precision); a job that went from submitted
to ended between two ticks was never seen running and is counted in neither.
"""

from collections.abc import Iterable, Iterator
from datetime import datetime

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, OutboxEvent, ReconcileTick
from slurm_adapter import JobState

# Buckets in seconds: a cluster job waits minutes to days, and runs as long.
JOB_TIME_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)
# An event is dispatched within seconds when all is well; the sweep's grace is 30 s by default.
DISPATCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)
DEFAULT_PARTITION = "default"


def job_partition(partition: str | None) -> str:
    return partition or DEFAULT_PARTITION


def age_seconds(moment: datetime | None, now: datetime) -> float:
    return max((now - moment).total_seconds(), 0.0) if moment is not None else 0.0


def cumulative_buckets(values: Iterable[float], bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Prometheus's cumulative (le, count) buckets ending with +Inf, and the sum of the values."""
    values = list(values)
    buckets = [(str(float(bound)), float(sum(1 for v in values if v <= bound))) for bound in bounds]
    buckets.append(("+Inf", float(len(values))))
    return buckets, float(sum(values))


def pending_and_run_times(histories: Iterable[list]) -> tuple[list[float], list[float]]:
    """From each job's state history: per attempt, submission to running, and running to its end."""
    pending, running = [], []
    ended = {state.value for state in JobState if state.is_final} | {ClusterJobState.REJECTED}
    for history in histories:
        submitted_at = started_at = None
        for entry in history if isinstance(history, list) else ():
            try:
                state, at = entry["state"], datetime.fromisoformat(entry["at"])
            except (KeyError, TypeError, ValueError):
                continue  # a hand-written entry: not a reason to fail the scrape
            if state == JobState.SUBMITTED:
                submitted_at, started_at = at, None
            elif state == JobState.RUNNING and started_at is None:
                started_at = at
                if submitted_at is not None:
                    pending.append((at - submitted_at).total_seconds())
            elif state in ended:
                if started_at is not None:
                    running.append((at - started_at).total_seconds())
                submitted_at = started_at = None
    return pending, running


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        yield from self.requests()
        yield from self.jobs(now)
        yield from self.outbox(now)
        yield from self.ticks(now)

    def requests(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("emg_requests", "Analysis requests by status.", labels=["status"])
        counts = dict(AnalysisRequest.objects.values_list("status").annotate(n=Count("id")).order_by())
        for status in AnalysisRequest.Status.values:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        cancelling = GaugeMetricFamily(
            "emg_requests_cancel_requested", "Unfinished requests whose cancellation an operator asked for."
        )
        cancelling.add_metric(
            [], AnalysisRequest.objects.unfinished().filter(cancel_requested_at__isnull=False).count()
        )
        yield cancelling

    def jobs(self, now: datetime) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "emg_cluster_jobs", "Cluster jobs by state and partition.", labels=["state", "partition"]
        )
        rows = ClusterJob.objects.values_list("state", "spec__partition").annotate(n=Count("id")).order_by()
        counts: dict[tuple[str, str], int] = {}
        for state, partition, n in rows:
            key = (state, job_partition(partition))
            counts[key] = counts.get(key, 0) + n
        for (state, partition), n in sorted(counts.items()):
            by_state.add_metric([state, partition], n)
        yield by_state

        live = ClusterJob.objects.live()
        unreadable = live.exclude(unreadable_state="")
        gauge = GaugeMetricFamily(
            "emg_cluster_jobs_unreadable",
            "Live jobs whose Slurm state we cannot read (polled on, never cancelled for it).",
        )
        gauge.add_metric([], unreadable.count())
        yield gauge
        oldest = unreadable.order_by("unreadable_since").values_list("unreadable_since", flat=True).first()
        gauge = GaugeMetricFamily(
            "emg_cluster_jobs_unreadable_oldest_age_seconds",
            "How long the longest-unreadable live job has been so (0: none).",
        )
        gauge.add_metric([], age_seconds(oldest, now))
        yield gauge

        pending = live.filter(state=ClusterJobState.PENDING).order_by("submit_time")
        oldest = pending.values_list("submit_time", flat=True).first()
        gauge = GaugeMetricFamily(
            "emg_cluster_jobs_oldest_pending_age_seconds",
            "Time since submission of the oldest job still pending in Slurm (0: none).",
        )
        gauge.add_metric([], age_seconds(oldest, now))
        yield gauge

        waiting = GaugeMetricFamily(
            "emg_cluster_jobs_waiting_out_sbatch_errors",
            "Declared jobs whose last sbatch failed in a way that may pass (retried).",
        )
        waiting.add_metric([], ClusterJob.objects.declared().exclude(submit_error="").count())
        yield waiting

        totals = ClusterJob.objects.aggregate(
            retries=Sum("retries"),
            attempts=Sum("attempts"),
            rejected=Count("id", filter=Q(state=ClusterJobState.REJECTED)),
        )
        for name, column, text in (
            ("emg_cluster_job_submissions", "attempts", "Submission attempts (sbatch claims) of all jobs."),
            ("emg_cluster_job_retries", "retries", "Jobs declared again with more memory or time."),
            ("emg_submissions_rejected", "rejected", "Jobs Slurm refused for good (REJECTED)."),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], totals[column] or 0)
            yield counter

        histories = ClusterJob.objects.filter(submit_time__isnull=False).values_list("history", flat=True)
        pending_times, run_times = pending_and_run_times(histories.iterator(chunk_size=500))
        for name, values, text in (
            ("emg_cluster_job_pending_seconds", pending_times, "Per attempt, submission to running (seen by ticks)."),
            ("emg_cluster_job_run_seconds", run_times, "Per attempt, running to its end (seen by ticks)."),
        ):
            buckets, total = cumulative_buckets(values, JOB_TIME_BUCKETS)
            histogram = HistogramMetricFamily(name, text)
            histogram.add_metric([], buckets, total)
            yield histogram

    def outbox(self, now: datetime) -> Iterator[Metric]:
        backlog = OutboxEvent.objects.filter(dispatched_at__isnull=True)
        gauge = GaugeMetricFamily("emg_outbox_backlog", "Outbox events not yet dispatched to a flow run.")
        gauge.add_metric([], backlog.count())
        yield gauge
        oldest = backlog.order_by("created_at").values_list("created_at", flat=True).first()
        gauge = GaugeMetricFamily(
            "emg_outbox_oldest_age_seconds", "Age of the oldest undispatched outbox event (0: none)."
        )
        gauge.add_metric([], age_seconds(oldest, now))
        yield gauge

        latency = ExpressionWrapper(F("dispatched_at") - F("created_at"), output_field=DurationField())
        dispatched = OutboxEvent.objects.filter(dispatched_at__isnull=False).annotate(latency=latency)
        values = [delta.total_seconds() for delta in dispatched.values_list("latency", flat=True).iterator()]
        buckets, total = cumulative_buckets(values, DISPATCH_BUCKETS)
        histogram = HistogramMetricFamily(
            "emg_outbox_dispatch_latency_seconds", "From an event's commit to its flow run being made."
        )
        histogram.add_metric([], buckets, total)
        yield histogram

    def ticks(self, now: datetime) -> Iterator[Metric]:
        last = ReconcileTick.objects.filter(finished_at__isnull=False).order_by("-id").first()
        report = last.report if last is not None and isinstance(last.report, dict) else {}
        gauge = GaugeMetricFamily(
            "emg_reconcile_last_tick_age_seconds",
            "Time since the last reconcile tick finished (since the epoch if none has).",
        )
        gauge.add_metric([], age_seconds(last.finished_at, now) if last else now.timestamp())
        yield gauge
        gauge = GaugeMetricFamily("emg_reconcile_last_tick_duration_seconds", "How long the last tick took.")
        gauge.add_metric([], float(report.get("duration_seconds") or 0))
        yield gauge
        gauge = GaugeMetricFamily(
            "emg_reconcile_last_tick_slurm_calls", "Slurm commands the last tick ran.", labels=["command"]
        )
        for command, n in sorted((report.get("slurm_calls") or {}).items()):
            gauge.add_metric([command], n)
        yield gauge
        gauge = GaugeMetricFamily("emg_reconcile_last_tick_errors", "Errors the last tick reported.")
        gauge.add_metric([], len(report.get("errors") or ()))
        yield gauge

        totals = report.get("totals") or {}
        for name, key, text in (
            ("emg_reconcile_ticks", "ticks", "Reconcile ticks that finished."),
            ("emg_flow_resumes", "resumed", "Suspended flow runs resumed by the reconciler."),
            ("emg_flow_reruns", "rerun", "Broken flow runs (crashed, failed, zombie) re-run by the reconciler."),
            ("emg_reconcile_errors", "errors", "Errors reported by reconcile ticks."),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], totals.get(key, 0))
            yield counter
        counter = CounterMetricFamily("emg_slurm_calls", "Slurm commands run by reconcile ticks.", labels=["command"])
        for command, n in sorted((totals.get("slurm_calls") or {}).items()):
            counter.add_metric([command], n)
        yield counter


def registry() -> CollectorRegistry:
    """A registry of our collector alone: the web process's own figures are not the service's."""
    collected = CollectorRegistry(auto_describe=False)
    collected.register(DatabaseCollector())
    return collected
