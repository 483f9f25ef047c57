"""`python manage.py requeue_events`: publish every undispatched outbox event again, now.

For after an outage, without waiting for the sweep. Publishing twice is harmless: the
consumer's idempotency key maps a trigger's run key (e.g. a request generation) to one flow run.
"""

from datetime import timedelta

from django.core.management import BaseCommand, CommandError
from django.utils import timezone

from emg.models import OutboxEvent
from emg.outbox import publish


class Command(BaseCommand):
    help = "Re-publish undispatched outbox events to the broker, showing progress."

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            type=float,
            default=0,
            metavar="SECONDS",
            help="only events created at least this long ago (default: all)",
        )

    def handle(self, *args, older_than: float, **options):
        cutoff = timezone.now() - timedelta(seconds=older_than)
        events = list(
            OutboxEvent.objects.filter(dispatched_at__isnull=True, created_at__lte=cutoff)
            .order_by("created_at")
            .values_list("id", "trigger", "run_key")
        )
        if not events:
            self.stdout.write("no undispatched events")
            return
        failed = 0
        for number, (event_id, trigger, run_key) in enumerate(events, start=1):
            published = publish(event_id)
            failed += not published
            outcome = "published" if published else self.style.ERROR("NOT published (see the log)")
            self.stdout.write(f"[{number}/{len(events)}] event {event_id} {trigger} {run_key}: {outcome}")
        self.stdout.write(f"published {len(events) - failed} of {len(events)} event(s)")
        if failed:
            raise CommandError(f"{failed} event(s) could not be published; is the broker up?")
