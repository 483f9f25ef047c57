#!/usr/bin/env python3
"""A stand-in for the assembly analysis Nextflow pipeline: contigs in, real figures out.

    analysis.py --contigs contigs.fasta --outdir D

Reads a FASTA of contigs, then measures GC content and the contig length distribution and
predicts open reading frames (six frames, ATG to the first in-frame stop, at least 100 codons;
frames that run off a contig's end are not counted, as their stop is unknown). Writes:

    D/analysis_summary.json                 see `summarise` for the keys
    D/predicted_orfs.faa                    the predicted proteins
    D/pipeline_info/execution_trace.txt     a Nextflow trace, one row per step run

Standard library only: it runs as a Slurm job with a clean environment and any python3.
Bad input ends it with exit status 1 and one line on stderr saying what and where.
"""

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# Beside this script (Python puts the script's directory on sys.path): the pipelines stand alone.
from nextflow_trace import TaskRecorder

MIN_ORF_CODONS = 100
NUCLEOTIDES = set("ACGTN")
COMPLEMENT = str.maketrans("ACGTN", "TGCAN")
# The standard genetic code, codons in TCAG order: TTT TTC TTA TTG TCT ... GGG.
AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
CODON_TABLE = {
    a + b + c: AMINO_ACIDS[16 * i + 4 * j + k]
    for i, a in enumerate("TCAG")
    for j, b in enumerate("TCAG")
    for k, c in enumerate("TCAG")
}
# Upper bounds (exclusive) of the length bins; the last bin is open-ended.
LENGTH_BINS = (500, 1000, 2500, 5000, 10000)


class PipelineError(Exception):
    """Bad input: reported as one line on stderr, exit status 1."""


@dataclass(frozen=True)
class Orf:
    contig: str
    strand: str
    frame: int
    start: int  # 0-based on the strand it was read from
    protein: str


def read_fasta(path: Path) -> dict[str, str]:
    """Contig name -> sequence, after checking it is a nucleotide FASTA with unique names."""
    contigs: dict[str, list[str]] = {}
    name = None
    try:
        with open(path) as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line.startswith(">"):
                    name = _new_contig_name(path, number, line, contigs)
                    contigs[name] = []
                elif line:
                    contigs[_checked_sequence_owner(path, number, name, line)].append(line.upper())
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"cannot read contigs {path}: {error}") from None
    if not contigs:
        raise PipelineError(f"{path}: no contigs (an empty assembly has nothing to analyse)")
    return {name: "".join(parts) for name, parts in contigs.items()}


def _new_contig_name(path: Path, number: int, line: str, contigs: dict) -> str:
    name = line[1:].split()[0] if line[1:].split() else ""
    if not name or name in contigs:
        raise PipelineError(f"{path}, line {number}: {'a duplicate' if name else 'an empty'} contig name")
    return name


def _checked_sequence_owner(path: Path, number: int, name: str | None, line: str) -> str:
    if name is None:
        raise PipelineError(f"{path}, line {number}: sequence before the first '>' header; not a FASTA file")
    if not set(line.upper()) <= NUCLEOTIDES:
        raise PipelineError(f"{path}, line {number}: not a nucleotide sequence: {line[:40]!r}")
    return name


def gc_percent(sequences: list[str]) -> float:
    gc = sum(sequence.count("G") + sequence.count("C") for sequence in sequences)
    called = sum(len(sequence) - sequence.count("N") for sequence in sequences)
    return round(100 * gc / called, 2) if called else 0.0


def length_distribution(lengths: list[int]) -> dict[str, int]:
    labels = [f"<{LENGTH_BINS[0]}"] + [f"{low}-{high - 1}" for low, high in zip(LENGTH_BINS, LENGTH_BINS[1:])]
    labels.append(f">={LENGTH_BINS[-1]}")
    counts = dict.fromkeys(labels, 0)
    for length in lengths:
        counts[labels[sum(length >= bound for bound in LENGTH_BINS)]] += 1
    return counts


def orfs_in_frame(contig: str, strand: str, sequence: str, frame: int) -> list[Orf]:
    """ORFs from the first ATG after each stop to the next in-frame stop, of at least MIN_ORF_CODONS."""
    found, start = [], None
    for position in range(frame, len(sequence) - 2, 3):
        codon = sequence[position : position + 3]
        if start is None and codon == "ATG":
            start = position
        elif start is not None and CODON_TABLE.get(codon) == "*":
            if (position - start) // 3 >= MIN_ORF_CODONS:
                protein = "".join(CODON_TABLE.get(sequence[i : i + 3], "X") for i in range(start, position, 3))
                found.append(Orf(contig, strand, frame, start, protein))
            start = None
    return found


def predict_orfs(contigs: dict[str, str]) -> list[Orf]:
    orfs = []
    for name, sequence in contigs.items():
        reverse = sequence.translate(COMPLEMENT)[::-1]
        for strand, stranded in (("+", sequence), ("-", reverse)):
            for frame in range(3):
                orfs += orfs_in_frame(name, strand, stranded, frame)
    return orfs


def write_proteins(path: Path, orfs: list[Orf]) -> None:
    with open(path, "w") as out:
        for number, orf in enumerate(orfs, start=1):
            out.write(
                f">orf_{number} contig={orf.contig} strand={orf.strand} frame={orf.frame}"
                f" start={orf.start} length_aa={len(orf.protein)}\n"
            )
            for start in range(0, len(orf.protein), 60):
                out.write(orf.protein[start : start + 60] + "\n")


def summarise(contigs: dict[str, str], orfs: list[Orf]) -> dict:
    """Keys: contigs, total_length, gc_percent, length_distribution {bin: count},
    orfs {count, per_kb, mean_length_aa, longest_aa, coding_percent}."""
    lengths = [len(sequence) for sequence in contigs.values()]
    total = sum(lengths)
    coding_bases = sum(3 * (len(orf.protein) + 1) for orf in orfs)
    return {
        "contigs": len(contigs),
        "total_length": total,
        "gc_percent": gc_percent(list(contigs.values())),
        "length_distribution": length_distribution(lengths),
        "orfs": {
            "count": len(orfs),
            "per_kb": round(1000 * len(orfs) / total, 3),
            "mean_length_aa": round(sum(len(orf.protein) for orf in orfs) / len(orfs), 1) if orfs else 0,
            "longest_aa": max((len(orf.protein) for orf in orfs), default=0),
            # ORFs on opposite strands may overlap, so this can exceed what a gene caller would report.
            "coding_percent": round(100 * coding_bases / total, 2),
        },
    }


def run(contigs_path: Path, outdir: Path) -> dict:
    (outdir / "pipeline_info").mkdir(parents=True, exist_ok=True)
    run_key = hashlib.md5(str(contigs_path.resolve()).encode()).hexdigest()
    recorder = TaskRecorder(outdir / "pipeline_info" / "execution_trace.txt", run_key)
    with recorder.task("VALIDATE_CONTIGS"):
        contigs = read_fasta(contigs_path)
    with recorder.task("PREDICT_ORFS"):
        orfs = predict_orfs(contigs)
        write_proteins(outdir / "predicted_orfs.faa", orfs)
    with recorder.task("SUMMARISE"):
        summary = summarise(contigs, orfs)
        (outdir / "analysis_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contigs", required=True, type=Path)
    parser.add_argument("--outdir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        summary = run(args.contigs, args.outdir)
    except PipelineError as error:
        print(f"analysis.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"analysis.py: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(
        f"analysed {summary['contigs']} contigs, {summary['total_length']} bases, GC {summary['gc_percent']}%,"
        f" {summary['orfs']['count']} ORFs: {args.outdir / 'analysis_summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
