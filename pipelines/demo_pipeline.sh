#!/bin/bash
# A stand-in for the Nextflow analysis pipeline, for the demo and the tests.
# Options arrive as `--name value` pairs, as Nextflow params do.
#   --study ACC        the study accession (required)
#   --outdir DIR       where results go (required)
#   --duration S       seconds of "work" (default 2)
#   --exit-code N      end with this exit code, to exercise failure handling (default 0)
set -euo pipefail

study="" outdir="" duration=2 exit_code=0
while [ $# -gt 0 ]; do
    case "$1" in
        --study) study="$2"; shift 2 ;;
        --outdir) outdir="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --exit-code) exit_code="$2"; shift 2 ;;
        *) echo "unknown option: $1" >&2; exit 64 ;;
    esac
done
[ -n "$study" ] && [ -n "$outdir" ] || { echo "usage: $0 --study ACC --outdir DIR" >&2; exit 64; }

mkdir -p "$outdir"
echo "analysing study $study in $(pwd)"
sleep "$duration"
printf 'study\t%s\nfinished\t%s\n' "$study" "$(date -u +%FT%TZ)" > "$outdir/summary.tsv"
echo "wrote $outdir/summary.tsv"
exit "$exit_code"
