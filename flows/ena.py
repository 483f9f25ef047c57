"""Fetching a study and its read runs from the ENA Portal API.

Each fetch is a Prefect task cached per accession with a persisted result, and the flow stores
what a generation fetched on its request (flows/analysis.py `study_runs`), so a resume never asks
ENA again. Server errors, rate limiting (429) and timeouts are retried with exponential backoff;
any other 4xx is an answer, not an outage.
"""

from datetime import timedelta

import httpx
from django.conf import settings
from prefect import task
from prefect.tasks import exponential_backoff

from emg.accessions import STUDY_ACCESSION_PATTERN

STUDY_FIELDS = ("study_accession", "secondary_study_accession", "study_title", "center_name", "first_public")
READ_RUN_FIELDS = (
    "run_accession",
    "sample_accession",
    "study_accession",
    "secondary_study_accession",
    "scientific_name",
    "tax_id",
    "library_layout",
    "library_strategy",
    "library_source",
    "instrument_platform",
    "instrument_model",
    "read_count",
    "base_count",
    "fastq_ftp",
    "fastq_md5",
    "fastq_bytes",
)
CACHE_FOR = timedelta(days=1)


class EnaError(Exception):
    """ENA answered, and the answer means this study cannot be processed."""


class UnknownStudy(EnaError):
    pass


class EnaUnavailable(Exception):
    """ENA did not answer properly (5xx, timeout, broken connection): worth retrying."""


def search(result: str, accession: str, fields: tuple[str, ...]) -> list[dict]:
    # The accession goes into the API's query language: anything but an accession could change
    # the query (`PRJEB1" OR study_accession="PRJEB2` would fetch another study).
    if not isinstance(accession, str) or not STUDY_ACCESSION_PATTERN.fullmatch(accession):
        raise EnaError(f"{str(accession)[:40]!r} is not an ENA study accession; ENA was not asked")
    # Secondary accessions (ERP/SRP/DRP) are matched on their own field.
    field = "study_accession" if accession.startswith("PRJ") else "secondary_study_accession"
    try:
        response = httpx.get(
            f"{settings.EMG_ENA_PORTAL_API}/search",
            params={"result": result, "query": f'{field}="{accession}"', "fields": ",".join(fields), "format": "json"},
            timeout=settings.EMG_ENA_TIMEOUT_SECONDS,
        )
    except httpx.TransportError as error:
        raise EnaUnavailable(f"ENA did not answer ({type(error).__name__}: {error})") from error
    if response.status_code >= 500 or response.status_code in (408, 429):
        # Overloaded, rate limiting us, or timed out: ask again later, never a verdict on the study.
        raise EnaUnavailable(f"ENA answered HTTP {response.status_code}")
    if response.status_code == 404:
        raise UnknownStudy(f"ENA does not know study {accession}")
    if response.status_code >= 400:
        raise EnaError(
            f"ENA rejected the {result} query for {accession}: HTTP {response.status_code} {response.text[:300]}"
        )
    if response.status_code == 204 or not response.content.strip():
        return []
    try:
        records = response.json()
    except ValueError as error:
        raise EnaError(f"ENA's answer for {accession} is not JSON: {response.text[:120]!r}") from error
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise EnaError(f"ENA's answer for {accession} is not a list of records")
    return records


def retry_when_unavailable(task, task_run, state) -> bool:
    try:
        state.result()
    except EnaUnavailable:
        return True
    except Exception:
        return False
    return False


def cache_per_accession(context, parameters) -> str:
    return f"{settings.EMG_INSTANCE_NAMESPACE}-{context.task.name}-{parameters['accession']}"


def ena_task(name: str):
    return task(
        name=name,
        retries=settings.EMG_ENA_RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.EMG_ENA_RETRY_DELAY_SECONDS),
        retry_condition_fn=retry_when_unavailable,
        cache_key_fn=cache_per_accession,
        cache_expiration=CACHE_FOR,
        persist_result=True,
    )


@ena_task("fetch-ena-study")
def fetch_study(accession: str) -> dict:
    records = search("study", accession, STUDY_FIELDS)
    if not records:
        raise UnknownStudy(f"ENA does not know study {accession}")
    return records[0]


@ena_task("fetch-ena-read-runs")
def fetch_read_runs(accession: str) -> list[dict]:
    return search("read_run", accession, READ_RUN_FIELDS)
