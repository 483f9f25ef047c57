#!/usr/bin/env bash
# Prints a slurm/*.conf.in template with each @NAME@ replaced by the value given as NAME=value;
# a placeholder left without a value is an error, so a template line added for one caller cannot
# reach the other caller's cluster half-filled. Values may span lines (TRACKING does); a line that
# is only a placeholder given an empty value is dropped (EXTRA: settings one caller adds, e.g. for
# a daemon only its cluster runs).
#
#   slurm/render.sh slurm/slurm.conf.in CLUSTER=emg HOST=localhost ...
#
# Used by scripts/slurm-up.sh (this machine's cluster) and docker/slurm-entrypoint.sh (the
# compose service): the one place their slurm.conf and slurmdbd.conf are written.
set -euo pipefail
# bash 5.2 would put the matched text in place of an & in a replacement value.
shopt -u patsub_replacement 2>/dev/null || true

die() { echo "slurm/render.sh: $*" >&2; exit 1; }

(($# >= 1)) || die "usage: render.sh TEMPLATE NAME=VALUE..."
template=$1
shift
[[ -r $template ]] || die "no template $template"
text=$(<"$template")
for pair in "$@"; do
    [[ $pair == *=* ]] || die "expected NAME=VALUE, got '$pair'"
    name=${pair%%=*}
    value=${pair#*=}
    [[ $name =~ ^[A-Z][A-Z0-9_]*$ ]] || die "bad placeholder name '$name'"
    [[ $text == *"@$name@"* ]] || die "$template has no @$name@"
    if [[ -z $value ]]; then # a line holding only an empty placeholder goes, blank line and all
        text=${text//$'\n'"@$name@"$'\n'/$'\n'}
        text=${text%$'\n'"@$name@"}
    fi
    text=${text//"@$name@"/"$value"}
done
if [[ $text =~ @([A-Z][A-Z0-9_]*)@ ]]; then
    die "$template: no value given for @${BASH_REMATCH[1]}@"
fi
printf '%s\n' "$text"
