"""ENA study accessions: what we accept, and the one error a person sees when it is wrong."""

import re

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

# ENA/INSDC study (project) and secondary study accessions, as the Portal API returns them.
STUDY_ACCESSION_PATTERN = re.compile(r"^(PRJ[EDN][A-Z][0-9]{1,9}|[EDS]RP[0-9]{6,9})$")
MAX_ACCESSION_LENGTH = 16


def validate_study_accession(value: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_ACCESSION_LENGTH or not STUDY_ACCESSION_PATTERN.fullmatch(value):
        raise ValidationError(
            "%(value)r is not an ENA study accession (expected e.g. PRJEB12345, PRJNA123456 or ERP123456).",
            code="invalid_accession",
            params={"value": value if not isinstance(value, str) else value[:40]},
        )


RUN_ACCESSION_PATTERN = re.compile(r"^[EDS]RR[0-9]{6,12}$")
SAMPLE_ACCESSION_PATTERN = re.compile(r"^(SAM[EDN][A-Z]?[0-9]{1,12}|[EDS]RS[0-9]{6,12})$")


validate_run_accession = RegexValidator(
    RUN_ACCESSION_PATTERN, "Not an ENA run accession (expected e.g. ERR1234567).", code="invalid_accession"
)
validate_sample_accession = RegexValidator(
    SAMPLE_ACCESSION_PATTERN, "Not an ENA sample accession (expected e.g. SAMEA1234567).", code="invalid_accession"
)
