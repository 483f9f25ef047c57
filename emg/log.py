"""One log format for every process of ours (Django, Celery, flow runs), with secrets masked.

Each record is one JSON line: time, level, logger, program, process, message (and the
traceback, if any), so the logs of all services can be read and searched the same way.

Masking happens on the record itself, before any handler formats it. The filter sits on
our console handler, which every propagating record reaches, and on the loggers whose
records Prefect ships to its API: those reach Prefect's database through Prefect's own
handler, never through ours.
"""

import json
import logging
import logging.config
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

MASK = "***"

# scheme://user:PASSWORD@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?=@)")
_SECRET_NAME = r"(?:SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?|BASIC_AUTH)"
# NAME=value, NAME: value, "NAME": "value", 'NAME': 'value' (dict reprs, JSON, env dumps, query strings).
_NAMED_SECRET = re.compile(
    rf"(?P<head>[\w.-]*{_SECRET_NAME}[\w.-]*[\"']?\s*[:=]\s*)"
    r"(?P<secret>\"[^\"]*\"|'[^']*'|[^\s\"',;&)}\]]+)",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(
    r"(?P<head>\bAuthorization[\"']?\s*[:=]\s*[\"']?(?:Basic|Bearer|Token)\s+)(?P<secret>[^\s\"',;]+)", re.IGNORECASE
)


def _masked(match: re.Match) -> str:
    secret = match["secret"]
    quote = secret[0] if secret[:1] in "\"'" and len(secret) > 1 and secret[-1] == secret[0] else ""
    return f"{match['head']}{quote}{MASK}{quote}"


def mask_secrets(text: str) -> str:
    """Replace passwords in URLs, auth headers and the values of secret-looking names with ***."""
    for pattern in (_URL_PASSWORD, _AUTH_HEADER, _NAMED_SECRET):
        text = pattern.sub(_masked, text)
    return text


class SecretMaskingFilter(logging.Filter):
    """Masks the record in place, so every handler after it sees only the masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


class JsonLinesFormatter(logging.Formatter):
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "program": self.program,
            "process": f"{record.processName}[{record.process}]",
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


# Prefect sends these loggers' records to its API (and so its database) from its own handler.
PREFECT_SHIPPED_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
masking_filter = SecretMaskingFilter()


def configure(config: dict) -> None:
    """Django's LOGGING_CONFIG: applied by django.setup() in the web server, Celery and flow runs."""
    logging.config.dictConfig(config)
    # Added to the loggers, not declared in LOGGING: declaring them would remove the API
    # handler Prefect has already attached. Filters survive Prefect configuring them later.
    for name in PREFECT_SHIPPED_LOGGERS:
        logging.getLogger(name).addFilter(masking_filter)


LOGGING_CONFIG = "emg.log.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json_lines": {"()": JsonLinesFormatter}},
    "filters": {"mask_secrets": {"()": SecretMaskingFilter}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json_lines", "filters": ["mask_secrets"]},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("EMG_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
