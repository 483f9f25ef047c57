"""What an error report (an admin mail, a debug page where DEBUG is on) may show of settings and of
the request's environment: Django masks names with KEY, SECRET, PASS, TOKEN...; ours also masks
connection URLs and DSNs, which carry passwords (DATABASE_URL, REDIS_URL, CELERY_BROKER_URL)."""

import re

from django.views.debug import SafeExceptionReporterFilter


class ConnectionUrlsMasked(SafeExceptionReporterFilter):
    # Django's own names and ours: extended, not copied, so it keeps what a Django upgrade adds.
    hidden_settings = re.compile(f"{SafeExceptionReporterFilter.hidden_settings.pattern}|URL|DSN", flags=re.IGNORECASE)
