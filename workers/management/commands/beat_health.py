"""`python manage.py beat_health`: exits 0 only if beat has sent every scheduled task lately.

The beat container's healthcheck: RedBeat writes a file never, but records in Redis when it last
sent each entry; a beat process that runs but no longer sends (stuck, its lock lost, Redis
unreachable) fails this, where a check of the process alone would pass.
"""

from django.core.management import BaseCommand, CommandError
from django.utils import timezone

from workers.beat import late_entries, send_lags
from workers.celery import app


class Command(BaseCommand):
    help = "Check that Celery beat has sent each of its scheduled tasks within three of its intervals."

    def add_arguments(self, parser):
        parser.add_argument(
            "--slack", type=float, default=30, help="seconds allowed beyond three intervals (default 30)"
        )

    def handle(self, *args, **options):
        lags = send_lags(app, timezone.now())
        late = late_entries(lags, options["slack"])
        if late:
            raise CommandError("beat is late: " + "; ".join(late))
        for name, (lag, interval) in lags.items():
            self.stdout.write(f"{name}: last sent {lag:.1f} s ago (every {interval:g} s)")
