"""When two cluster jobs are the same job.

A fingerprint is a SHA-256 over the job spec (script, resources, work dir, partition,
allowed environment) in a canonical JSON form, and the *contents* of each declared input
file, read in fixed-size chunks so a large samplesheet or reads file never sits in memory.
The job's human name is left out: renaming a job does not change the work it does.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from slurm_adapter.spec import JobSpec

CHUNK_BYTES = 1024 * 1024


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_inputs(paths: Iterable[str | Path]) -> dict[str, str]:
    """Content hash of each input file, keyed by its absolute path; a missing input raises."""
    return {str(Path(path).resolve()): file_sha256(path) for path in sorted({str(p) for p in paths})}


def fingerprint(spec: JobSpec, input_hashes: Mapping[str, str]) -> str:
    identity = {key: value for key, value in spec.to_dict().items() if key != "name"}
    canonical = json.dumps(
        {"spec": identity, "inputs": dict(sorted(input_hashes.items()))}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
