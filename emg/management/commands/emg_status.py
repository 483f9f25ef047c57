"""`python manage.py emg_status`: requests, jobs and flow runs at a glance, and whatever is stuck."""

from datetime import timedelta

from django.conf import settings
from django.core.management import BaseCommand
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from emg.models import FINAL_JOB_STATES, AnalysisRequest, ClusterJob, JobWait, OutboxEvent, ReconcileTick, last_checked

# Something the reconciler should have touched within this many of its intervals is stuck.
STALE_INTERVALS = 5


def age(moment, now) -> str:
    if moment is None:
        return "-"
    seconds = int((now - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [["-" if value in (None, "") else str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells)


# The most flow runs Prefect's API returns for one filter call (it refuses a larger `limit`).
PREFECT_PAGE_SIZE = 200


def flow_run_states(flow_run_ids: list) -> tuple[dict, str]:
    """Each flow run's Prefect state name, from one API call per PREFECT_PAGE_SIZE runs; and why not,
    if Prefect did not answer."""
    if not flow_run_ids:
        return {}, ""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states = {}
    try:
        with get_client(sync_client=True) as client:
            for start in range(0, len(flow_run_ids), PREFECT_PAGE_SIZE):
                page = flow_run_ids[start : start + PREFECT_PAGE_SIZE]
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
                )
                states.update({run.id: run.state.name if run.state else "-" for run in runs})
    except Exception as error:  # the table is still worth printing without Prefect
        return states, f"Prefect API did not answer ({type(error).__name__}); flow run states unknown"
    return states, ""


class Command(BaseCommand):
    help = "Print requests, cluster jobs and flow runs, and anything stuck."

    def add_arguments(self, parser):
        parser.add_argument("--ended", type=int, default=10, help="how many ended requests and jobs to show (10)")

    def handle(self, *args, ended: int, **options):
        now = timezone.now()
        with_study = AnalysisRequest.objects.select_related("study")
        requests = list(with_study.unfinished().order_by("created_at")) + list(
            with_study.filter(status__in=AnalysisRequest.FINAL_STATUSES).order_by("-finished_at", "-id")[:ended]
        )
        states, prefect_note = flow_run_states([r.flow_run_id for r in requests if r.flow_run_id])
        self.section(
            "Requests",
            ["id", "study", "status", "step", "gen", "flow run", "Prefect", "age", "reason"],
            [
                [
                    r.id,
                    r.study.accession,
                    r.status,
                    r.current_step,
                    r.generation,
                    r.flow_run_id,
                    states.get(r.flow_run_id),
                    age(r.created_at, now),
                    r.status_reason[:60],
                ]
                for r in requests
            ],
        )
        if prefect_note:
            self.stdout.write(self.style.WARNING(prefect_note))

        jobs = list(ClusterJob.objects.live().order_by("created_at").prefetch_related("waits")) + list(
            ClusterJob.objects.filter(state__in=FINAL_JOB_STATES)
            .order_by("-ended_at", "-id")
            .prefetch_related("waits")[:ended]
        )
        read_at = ReconcileTick.job_states_last_read_at()
        self.section(
            "Cluster jobs",
            ["id", "name", "Slurm id", "state", "exit", "attempts", "checked", "requests"],
            [
                [
                    j.id,
                    j.name,
                    j.slurm_job_id,
                    j.state,
                    j.exit_code,
                    j.attempts,
                    age(last_checked(j, read_at), now),
                    ",".join(f"#{w.request_id}" for w in j.waits.all() if w.request_id),
                ]
                for j in jobs
            ],
        )

        stuck = self.stuck(now)
        self.stdout.write("\nStuck")
        for line in stuck:
            self.stdout.write(self.style.WARNING(f"  {line}"))
        if not stuck:
            self.stdout.write(self.style.SUCCESS("  nothing stuck"))

    def section(self, title: str, headers: list[str], rows: list[list]) -> None:
        self.stdout.write(f"\n{title} ({len(rows)})")
        self.stdout.write(table(headers, rows) if rows else "  none")

    def stuck(self, now) -> list[str]:
        interval = timedelta(seconds=settings.EMG_RECONCILE_INTERVAL_SECONDS)
        stale = now - STALE_INTERVALS * interval
        grace = now - timedelta(seconds=settings.EMG_OUTBOX_GRACE_SECONDS)
        lines = []

        last_tick = ReconcileTick.objects.order_by("-started_at").first()
        if last_tick is None or last_tick.started_at < stale:
            since = f"for {age(last_tick.started_at, now)}" if last_tick else "yet"
            lines.append(
                f"the reconciler has not ticked {since} (every {interval.total_seconds():g}s expected): "
                f"is Celery beat running?"
            )

        for event in OutboxEvent.objects.filter(dispatched_at__isnull=True, created_at__lt=grace).order_by(
            "created_at"
        ):
            lines.append(
                f"event {event.id} ({event.trigger} {event.run_key}) not dispatched "
                f"after {age(event.created_at, now)}, published {event.publish_attempts} time(s)"
                + (f": {event.last_error[:100]}" if event.last_error else "")
            )

        read_at = ReconcileTick.job_states_last_read_at()
        if read_at is None or read_at < stale:  # a recent tick read every awaited job: none is stale
            for job in ClusterJob.objects.awaited().filter(Q(state_checked_at__lt=stale) | Q(state_checked_at=None)):
                lines.append(
                    f"job #{job.id} (Slurm {job.slurm_job_id or '-'}, {job.state}) not checked for "
                    f"{age(last_checked(job, read_at), now)}"
                )

        for job in ClusterJob.objects.live().exclude(unreadable_state=""):
            lines.append(
                f"job #{job.id} (Slurm {job.slurm_job_id}, last read {job.state}): Slurm reports "
                f"{job.unreadable_state!r}, which we cannot read, for {age(job.unreadable_since, now)}; "
                f"still polled, never cancelled for it"
            )
        for job in ClusterJob.objects.declared().exclude(submit_error=""):
            lines.append(
                f"job #{job.id} ({job.name}): sbatch failed, retried after "
                f"{job.next_submit_at:%Y-%m-%d %H:%M:%S}: {job.submit_error[:200]}"
            )

        live_wait = JobWait.objects.filter(request=OuterRef("pk"), released_at__isnull=True).exclude(
            job__state__in=FINAL_JOB_STATES
        )
        waiting = AnalysisRequest.objects.filter(status=AnalysisRequest.Status.WAITING, updated_at__lt=stale)
        for request in waiting.exclude(Exists(live_wait)):
            lines.append(
                f"request #{request.id} WAITING for {age(request.updated_at, now)} with no live job "
                f"(flow run {request.flow_run_id})"
            )

        for request in AnalysisRequest.objects.unfinished().filter(cancel_requested_at__lt=stale):
            lines.append(
                f"request #{request.id} still {request.status} {age(request.cancel_requested_at, now)} "
                f"after its cancellation was requested"
            )
        return lines
