"""Secrets never reach a log line: the masking rules, and the logging Django configures with them."""

import io
import json
import logging
import secrets

import pytest

from emg.log import mask_secrets

SECRET = "s3cr3t-" + secrets.token_hex(6)


@pytest.mark.parametrize(
    "text",
    [
        f"connecting to postgres://emg:{SECRET}@db.internal:5432/emg",
        f"broker redis://:{SECRET}@127.0.0.1:6379/0 is down",
        f"AWS_SECRET_ACCESS_KEY={SECRET}",
        f"env: {{'AWS_SECRET_ACCESS_KEY': '{SECRET}', 'HOME': '/root'}}",
        f'{{"api_key": "{SECRET}", "user": "ops"}}',
        f"GET /callback?access_token={SECRET}&page=2",
        f"PREFECT_API_KEY: {SECRET}",
        f"DJANGO_SECRET_KEY={SECRET} DEBUG=0",
        f"db_passwd={SECRET}",
        f"password = '{SECRET} with spaces'",
        f"Authorization: Bearer {SECRET}",
        f"FLOWER_BASIC_AUTH=operator:{SECRET}",
    ],
)
def test_secret_is_masked(text):
    masked = mask_secrets(text)
    assert SECRET not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    "text",
    [
        "request #12 for PRJEB12345 completed (Slurm job 4242, exit code 0)",
        "http://127.0.0.1:4200/api/flow_runs/filter",
        "redis://127.0.0.1:6379/15",
        "key=value and PATH=/usr/bin:/bin",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert mask_secrets(text) == text


def test_masking_keeps_what_an_operator_needs_to_debug():
    assert mask_secrets(f"postgres://emg:{SECRET}@db:5432/emg") == "postgres://emg:***@db:5432/emg"
    assert mask_secrets(f'{{"token": "{SECRET}", "n": 1}}') == '{"token": "***", "n": 1}'


@pytest.fixture
def console_output():
    """What Django's configured console handler writes, redirected into a buffer."""
    [console] = [handler for handler in logging.getLogger().handlers if handler.get_name() == "console"]
    buffer = io.StringIO()
    previous = console.setStream(buffer)
    yield buffer
    console.setStream(previous)


def test_configured_logging_writes_masked_json_lines(console_output):
    logging.getLogger("emg.test").warning("cannot reach %s", f"redis://:{SECRET}@10.0.0.1:6379/0")

    [line] = console_output.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "cannot reach redis://:***@10.0.0.1:6379/0"
    assert (entry["level"], entry["logger"]) == ("WARNING", "emg.test")
    assert {"time", "program", "process"} <= set(entry)


def test_secret_in_a_traceback_is_masked(console_output):
    try:
        raise ConnectionError(f"could not connect with password={SECRET}")
    except ConnectionError:
        logging.getLogger("emg.test").exception("database down")

    output = console_output.getvalue()
    assert SECRET not in output
    assert "password=***" in json.loads(output)["exception"]


def test_flow_run_logs_are_masked_before_prefect_ships_them_to_its_api():
    """Prefect's API handler hangs on its own loggers; it must receive the masked record too."""
    shipped = []

    class ApiStandIn(logging.Handler):
        def emit(self, record):
            shipped.append(self.format(record))

    handler = ApiStandIn()
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    try:
        flow_logger.info("submitting with GITHUB_TOKEN=%s", SECRET)
    finally:
        flow_logger.removeHandler(handler)

    assert shipped == ["submitting with GITHUB_TOKEN=***"]
