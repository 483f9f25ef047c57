"""`python manage.py reconcile --once`: one reconciler tick by hand, e.g. while beat is down."""

from django.core.management import BaseCommand, CommandError

from workers.reconcile.ticks import run_tick
from workers.reconciler import TickReport


def describe(report: TickReport) -> list[str]:
    changed = ", ".join(f"{job_id} -> {state}" for job_id, state in report.changed.items())
    return [
        f"checked {report.checked} awaited job(s) with Slurm",
        f"changed: {changed or 'none'}",
        f"submitted: {', '.join(report.submitted) or 'none'}",
        f"adopted: {', '.join(report.adopted) or 'none'}",
        f"rejected by Slurm: {', '.join(f'#{job_id}' for job_id in report.rejected) or 'none'}",
        f"unreadable: {', '.join(f'{job_id} ({raw})' for job_id, raw in report.unreadable.items()) or 'none'}",
        f"resumed flow runs: {', '.join(str(run) for run in report.resumed) or 'none'}",
        f"released waits: {report.released}",
    ]


class Command(BaseCommand):
    help = "Run one reconciler tick now (the same code, and the same lock, as Celery beat's)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--once", action="store_true", required=True, help="one tick, then exit (beat runs the periodic ones)"
        )

    def handle(self, *args, **options):
        report = run_tick()
        if report is None:
            raise CommandError("another reconcile tick is running (it holds the tick lock); try again in a moment")
        for line in describe(report):
            self.stdout.write(line)
        for error in report.errors:
            self.stderr.write(self.style.ERROR(f"error: {error}"))
        if report.errors:
            raise CommandError(f"the tick finished with {len(report.errors)} error(s)")
