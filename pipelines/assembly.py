#!/usr/bin/env python3
"""A stand-in for the assembly Nextflow pipeline: real reads in, a real (small) assembly out.

    assembly.py --samplesheet S.csv --outdir D [--k 21] [--min-contig-length 200]

The samplesheet is the nf-core style CSV `sample,run,fastq_1,fastq_2` (fastq_2 empty for
single-end); each FASTQ is an http(s) URL or a local path, gzipped or plain. The pipeline
fetches and validates every read file, builds a de Bruijn graph of all reads (k-mers of both
strands; k-mers seen once are taken as sequencing errors and dropped), walks its unambiguous
paths (unitigs) into contigs, and writes:

    D/contigs.fasta                         contigs of at least --min-contig-length bases
    D/assembly_stats.json                   {"reads", "bases", "contigs", "total_length", "n50", "longest", "k"}
    D/pipeline_info/execution_trace.txt     a Nextflow trace, one row per step run

Standard library only: it runs as a Slurm job with a clean environment and any python3.
Bad input ends it with exit status 3 (INPUT_REJECTED) and one line on stderr saying what and
where, so an operator can tell rejected data from a crash (1) or a usage error (2).
"""

import argparse
import csv
import gzip
import hashlib
import json
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Beside this script (Python puts the script's directory on sys.path): the pipelines stand alone.
from nextflow_trace import TaskRecorder

SAMPLESHEET_COLUMNS = ("sample", "run", "fastq_1", "fastq_2")
COMPLEMENT = str.maketrans("ACGT", "TGCA")
BASES = "ACGT"
DOWNLOAD_TIMEOUT_SECONDS = 120


INPUT_REJECTED = 3


class PipelineError(Exception):
    """Bad input: reported as one line on stderr, exit status INPUT_REJECTED."""


@dataclass(frozen=True)
class SampleRow:
    sample: str
    run: str
    fastqs: tuple[str, ...]


# --- samplesheet and reads ----------------------------------------------------------------------


def read_samplesheet(path: Path) -> list[SampleRow]:
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != SAMPLESHEET_COLUMNS:
                expected = ",".join(SAMPLESHEET_COLUMNS)
                raise PipelineError(f"{path}: the header must be {expected}, not {reader.fieldnames}")
            rows = [_sample_row(path, number, record) for number, record in enumerate(reader, start=2)]
    except OSError as error:
        raise PipelineError(f"cannot read samplesheet {path}: {error.strerror}") from None
    if not rows:
        raise PipelineError(f"{path}: the samplesheet lists no runs")
    return rows


def _sample_row(path: Path, number: int, record: dict[str, str]) -> SampleRow:
    sample, run, fastq_1, fastq_2 = (record[column].strip() for column in SAMPLESHEET_COLUMNS)
    if not (sample and run and fastq_1):
        raise PipelineError(f"{path}, line {number}: sample, run and fastq_1 are required")
    return SampleRow(sample, run, (fastq_1, fastq_2) if fastq_2 else (fastq_1,))


def fetch(source: str, destination: Path) -> None:
    """Copy a read file from an http(s) URL or a local path."""
    try:
        if source.startswith(("http://", "https://")):
            with (
                urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response,
                open(destination, "wb") as out,
            ):
                shutil.copyfileobj(response, out)
        else:
            shutil.copyfile(source, destination)
    except urllib.error.HTTPError as error:
        raise PipelineError(f"cannot fetch {source}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise PipelineError(f"cannot fetch {source}: {reason}") from None


def open_fastq(path: Path):
    """A text handle on a FASTQ file, gzipped or not (decided by its magic bytes, not its name)."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gzipped else open(path)


def read_fastq(path: Path, label: str) -> list[str]:
    """The sequences of a FASTQ file, after checking every record's four-line structure."""
    sequences = []
    try:
        with open_fastq(path) as handle:
            while header := handle.readline():
                sequence, plus, quality = (handle.readline().rstrip("\r\n") for _ in range(3))
                record = (header.rstrip("\r\n"), sequence, plus, quality)
                sequences.append(_checked_record(label, len(sequences) + 1, *record))
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise PipelineError(f"{label}: not a readable FASTQ file ({error})") from None
    return sequences


def _checked_record(label: str, number: int, header: str, sequence: str, plus: str, quality: str) -> str:
    where = f"{label}, record {number} (line {4 * number - 3})"
    if not header.startswith("@"):
        raise PipelineError(f"{where}: a FASTQ record starts with '@', found {header[:40]!r}")
    if not plus.startswith("+"):
        raise PipelineError(f"{where}: the third line of a FASTQ record starts with '+', found {plus[:40]!r}")
    if not sequence or len(sequence) != len(quality):
        raise PipelineError(
            f"{where}: sequence and quality differ in length ({len(sequence)} and {len(quality)}),"
            " or the file is truncated"
        )
    return sequence.upper()


# --- de Bruijn graph assembly ---------------------------------------------------------------------


def reverse_complement(sequence: str) -> str:
    return sequence.translate(COMPLEMENT)[::-1]


def canonical(kmer: str) -> str:
    """A k-mer and its reverse complement are the same piece of double-stranded DNA."""
    return min(kmer, reverse_complement(kmer))


def count_kmers(reads: list[str], k: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for read in reads:
        for start in range(len(read) - k + 1):
            kmer = read[start : start + k]
            if "N" not in kmer:
                key = canonical(kmer)
                counts[key] = counts.get(key, 0) + 1
    return counts


def successors(kmer: str, solid: dict[str, int]) -> list[str]:
    return [kmer[1:] + base for base in BASES if canonical(kmer[1:] + base) in solid]


def predecessors(kmer: str, solid: dict[str, int]) -> list[str]:
    return [base + kmer[:-1] for base in BASES if canonical(base + kmer[:-1]) in solid]


def extend(kmer: str, solid: dict[str, int], used: set[str]) -> str:
    """Bases to append to `kmer` while the path forward is unambiguous (one way out, one way in)."""
    bases = []
    current = kmer
    while len(following := successors(current, solid)) == 1:
        nxt = following[0]
        if len(predecessors(nxt, solid)) != 1 or canonical(nxt) in used:
            break
        used.add(canonical(nxt))
        bases.append(nxt[-1])
        current = nxt
    return "".join(bases)


def assemble(reads: list[str], k: int) -> list[tuple[str, float]]:
    """Unitigs of the graph of k-mers seen at least twice, as (sequence, mean k-mer coverage), longest first."""
    solid = {kmer: count for kmer, count in count_kmers(reads, k).items() if count >= 2}
    used: set[str] = set()
    contigs = []
    for seed in solid:
        if seed in used:
            continue
        used.add(seed)
        forward = extend(seed, solid, used)
        backward = extend(reverse_complement(seed), solid, used)
        contig = reverse_complement(backward) + seed + forward
        kmers = [canonical(contig[i : i + k]) for i in range(len(contig) - k + 1)]
        contigs.append((contig, sum(solid[kmer] for kmer in kmers) / len(kmers)))
    return sorted(contigs, key=lambda item: (-len(item[0]), item[0]))


def n50(lengths: list[int]) -> int:
    """The length L such that contigs of at least L bases hold half the assembly."""
    running = 0
    for length in sorted(lengths, reverse=True):
        running += length
        if 2 * running >= sum(lengths):
            return length
    return 0


def write_fasta(path: Path, contigs: list[tuple[str, float]]) -> None:
    with open(path, "w") as out:
        for number, (sequence, coverage) in enumerate(contigs, start=1):
            out.write(f">contig_{number} len={len(sequence)} cov={coverage:.1f}\n")
            for start in range(0, len(sequence), 80):
                out.write(sequence[start : start + 80] + "\n")


# --- the pipeline ---------------------------------------------------------------------------------


def fetch_and_check(row: SampleRow, work: Path, recorder: TaskRecorder) -> list[str]:
    """FETCH_READS and READ_QC for one run: its reads, after checking both mates agree."""
    with recorder.task(f"FETCH_READS ({row.sample})"):
        local = []
        for mate, source in enumerate(row.fastqs, start=1):
            local.append(work / f"{row.run}_{mate}.fastq")
            fetch(source, local[-1])
    with recorder.task(f"READ_QC ({row.sample})"):
        mates = [read_fastq(path, source) for path, source in zip(local, row.fastqs)]
        if len(mates) == 2 and len(mates[0]) != len(mates[1]):
            raise PipelineError(f"run {row.run}: fastq_1 has {len(mates[0])} reads, fastq_2 {len(mates[1])}")
    return [read for mate in mates for read in mate]


def run(samplesheet: Path, outdir: Path, k: int, min_contig_length: int) -> dict:
    rows = read_samplesheet(samplesheet)
    (outdir / "pipeline_info").mkdir(parents=True, exist_ok=True)
    run_key = hashlib.md5(samplesheet.read_bytes() + f"{k},{min_contig_length}".encode()).hexdigest()
    recorder = TaskRecorder(outdir / "pipeline_info" / "execution_trace.txt", run_key)
    reads = []
    with tempfile.TemporaryDirectory(prefix="assembly-reads-") as work:
        for row in rows:
            reads += fetch_and_check(row, Path(work), recorder)
    with recorder.task("ASSEMBLE"):
        contigs = [contig for contig in assemble(reads, k) if len(contig[0]) >= min_contig_length]
        write_fasta(outdir / "contigs.fasta", contigs)
    with recorder.task("CONTIG_STATS"):
        lengths = [len(sequence) for sequence, _ in contigs]
        stats = {
            "reads": len(reads),
            "bases": sum(map(len, reads)),
            "contigs": len(contigs),
            "total_length": sum(lengths),
            "n50": n50(lengths),
            "longest": max(lengths, default=0),
            "k": k,
        }
        (outdir / "assembly_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplesheet", required=True, type=Path)
    parser.add_argument("--outdir", required=True, type=Path)
    parser.add_argument("--k", type=int, default=21, help="k-mer length, odd (default 21)")
    # Both spellings: the orchestrator passes options by their declared (Nextflow-style) names.
    parser.add_argument("--min-contig-length", "--min_contig_length", dest="min_contig_length", type=int, default=200)
    args = parser.parse_args(argv)
    # An odd k means no k-mer is its own reverse complement, which the unitig walk relies on.
    if args.k < 11 or args.k % 2 == 0:
        parser.error(f"--k must be odd and at least 11, not {args.k}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        stats = run(args.samplesheet, args.outdir, args.k, args.min_contig_length)
    except PipelineError as error:
        print(f"assembly.py: error: {error}", file=sys.stderr)
        return INPUT_REJECTED
    except OSError as error:
        print(f"assembly.py: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(
        f"assembled {stats['reads']} reads into {stats['contigs']} contigs, {stats['total_length']} bases,"
        f" N50 {stats['n50']}: {args.outdir / 'contigs.fasta'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
