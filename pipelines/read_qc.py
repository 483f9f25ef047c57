#!/usr/bin/env python3
"""A stand-in for the raw-reads QC pipeline (fastp's report, in small): one run's reads in, its QC out.

    read_qc.py --run ERR4801201 --fastq URL_OR_PATH [--fastq MATE_2] --outdir D

Each FASTQ is an http(s) URL or a local path, gzipped or plain. The pipeline fetches every file,
checks every record as the assembly's READ_QC does (and that mates hold as many reads), and writes:

    D/qc_summary.json                       {"run", "reads", "bases", "mean_length", "gc_percent",
                                             "mean_quality", "q30_percent"}
    D/pipeline_info/execution_trace.txt     a Nextflow trace, one row per step run

Whether a run passes is the orchestrator's call (its thresholds are settings), not this script's.
Standard library only. Bad input: exit status 3 (INPUT_REJECTED) and one line on stderr.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Beside this script: the pipelines stand alone, and share the assembly's reading and checking.
from assembly import INPUT_REJECTED, PipelineError, _checked_record, fetch, open_fastq
from nextflow_trace import TaskRecorder

PHRED_OFFSET = 33
Q30 = 30


class Tally:
    """Running totals over every read of a run: nothing is held in memory but counts."""

    def __init__(self) -> None:
        self.reads = self.bases = self.gc = self.quality_sum = self.q30_bases = 0

    def add(self, sequence: str, quality: str) -> None:
        self.reads += 1
        self.bases += len(sequence)
        self.gc += sequence.count("G") + sequence.count("C")
        scores = [ord(symbol) - PHRED_OFFSET for symbol in quality]
        self.quality_sum += sum(scores)
        self.q30_bases += sum(1 for score in scores if score >= Q30)

    def summary(self, run: str) -> dict:
        bases = self.bases or 1  # an empty run is rejected before this; no division by zero regardless
        return {
            "run": run,
            "reads": self.reads,
            "bases": self.bases,
            "mean_length": round(self.bases / (self.reads or 1), 1),
            "gc_percent": round(100 * self.gc / bases, 2),
            "mean_quality": round(self.quality_sum / bases, 2),
            "q30_percent": round(100 * self.q30_bases / bases, 2),
        }


def tally_file(path: Path, label: str, tally: Tally) -> int:
    """Add one FASTQ file's reads to `tally`, checking each record; the number of reads in it."""
    count = 0
    try:
        with open_fastq(path) as handle:
            while header := handle.readline():
                sequence, plus, quality = (handle.readline().rstrip("\r\n") for _ in range(3))
                count += 1
                checked = _checked_record(label, count, header.rstrip("\r\n"), sequence, plus, quality)
                tally.add(checked, quality)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise PipelineError(f"{label}: not a readable FASTQ file ({error})") from None
    return count


def run(accession: str, fastqs: list[str], outdir: Path) -> dict:
    (outdir / "pipeline_info").mkdir(parents=True, exist_ok=True)
    recorder = TaskRecorder(outdir / "pipeline_info" / "execution_trace.txt", accession)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="read-qc-") as scratch:
        local = []
        with recorder.task(f"FETCH_READS ({accession})"):
            for mate, source in enumerate(fastqs, start=1):
                destination = Path(scratch) / f"{accession}_{mate}.fastq"
                fetch(source, destination)
                local.append((source, destination))
        with recorder.task(f"READ_QC ({accession})"):
            counts = [tally_file(path, source, tally) for source, path in local]
            if len(set(counts)) > 1:
                raise PipelineError(f"run {accession}: its mates hold different numbers of reads ({counts})")
            if not tally.reads:
                raise PipelineError(f"run {accession}: no reads in {', '.join(fastqs)}")
    with recorder.task(f"QC_SUMMARY ({accession})"):
        summary = tally.summary(accession)
        (outdir / "qc_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run's accession (names the trace and the summary)")
    parser.add_argument("--fastq", action="append", required=True, help="a read file: once, or twice for mates")
    parser.add_argument("--outdir", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if len(args.fastq) > 2:
        print(f"read_qc.py: error: at most two read files (mates), given {len(args.fastq)}", file=sys.stderr)
        return 2
    try:
        summary = run(args.run, args.fastq, args.outdir)
    except PipelineError as error:
        print(f"read_qc.py: error: {error}", file=sys.stderr)
        return INPUT_REJECTED
    except OSError as error:
        print(f"read_qc.py: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(
        f"{summary['run']}: {summary['reads']} reads, {summary['bases']} bases,"
        f" mean quality {summary['mean_quality']}, Q30 {summary['q30_percent']}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
