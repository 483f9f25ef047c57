"""Writing what ENA told us about a study into the EMG database, and the samplesheet for its reads.

Every function here is idempotent: the flow re-runs from the top at every resume.
"""

import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction

from emg.models import Run, Sample, Study
from slurm_adapter.fingerprint import file_sha256


@transaction.atomic
def store_study_and_runs(study: Study, study_record: dict, run_records: list[dict]) -> list[Run]:
    """Upsert the study's title, its samples and runs; validation errors name the bad accession."""
    title = (study_record.get("study_title") or "")[:500]
    if title and study.title != title:
        Study.objects.filter(id=study.id).update(title=title)
    runs = []
    for record in run_records:
        sample = Sample(
            accession=record.get("sample_accession", ""),
            study=study,
            scientific_name=(record.get("scientific_name") or "")[:255],
            tax_id=str(record.get("tax_id") or ""),
        )
        sample.full_clean(exclude=["study"], validate_unique=False)
        sample, _ = Sample.objects.update_or_create(
            accession=sample.accession,
            defaults={"study": study, "scientific_name": sample.scientific_name, "tax_id": sample.tax_id},
        )
        run = Run(
            accession=record.get("run_accession", ""),
            study=study,
            sample=sample,
            library_layout=record.get("library_layout", "")[:16],
            library_strategy=record.get("library_strategy", "")[:64],
            instrument_model=record.get("instrument_model", "")[:128],
            read_count=int(record["read_count"]) if str(record.get("read_count", "")).isdigit() else None,
            fastq_ftp=split_list(record.get("fastq_ftp")),
            fastq_md5=split_list(record.get("fastq_md5")),
        )
        run.full_clean(exclude=["study", "sample"], validate_unique=False)
        run, _ = Run.objects.update_or_create(
            accession=run.accession,
            defaults={
                field: getattr(run, field)
                for field in (
                    "study",
                    "sample",
                    "library_layout",
                    "library_strategy",
                    "instrument_model",
                    "read_count",
                    "fastq_ftp",
                    "fastq_md5",
                )
            },
        )
        runs.append(run)
    return runs


def split_list(value) -> list[str]:
    return [item for item in (value or "").split(";") if item]


def read_urls(run: Run) -> list[str]:
    """The run's read files as URLs (ENA lists them as `host/path`)."""
    return [f"{settings.EMG_ENA_FASTQ_URL_PREFIX}{path}" for path in run.fastq_ftp]


def samplesheet_text(runs: list[Run]) -> str:
    """One row per run, reads as URLs: the format the assembly pipeline (and nf-core) takes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sample", "run", "fastq_1", "fastq_2"])
    for run in sorted(runs, key=lambda run: run.accession):
        urls = read_urls(run)
        if not urls:
            continue
        writer.writerow([run.sample.accession, run.accession, urls[0], urls[1] if len(urls) > 1 else ""])
    return out.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """A reader sees the whole file or none; concurrent writers each use a temporary file of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensure_samplesheet(path: Path, runs: list[Run]) -> Path:
    """Write the study's samplesheet once. An operator may edit it between attempts; jobs never read
    it directly but a copy named by its content (`content_addressed`), so an edit means a new job."""
    if not path.exists():
        write_atomically(path, samplesheet_text(runs).encode())
    return path


def content_addressed(source: Path, directory: Path) -> Path:
    """An immutable copy of `source` at `directory/<sha256><suffix>`: what a job read can never change.

    The bytes are read once and named by their own hash, so an edit racing this copy yields either
    the old content under the old name or the new under the new one. A copy found damaged is rewritten.
    """
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    target = directory / f"{digest}{source.suffix}"
    if not target.exists() or file_sha256(target) != digest:
        write_atomically(target, data)
    return target
