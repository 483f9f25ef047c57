#!/usr/bin/env bash
# Model-checks the ClusterJob submission protocol (docs/protocol/submission.pml) with spin.
#
#   scripts/model-check.sh               every property of the real model; exits 1 on any violation
#   scripts/model-check.sh -D BUG ...    the safety check with planted bug(s) BUG (see the model's
#                                        header); exits 1 and prints the counterexample if caught
#   scripts/model-check.sh --planted     every planted bug must be caught; exits 1 if one is not
#
# A violation prints "VIOLATED: <property>" and the counterexample trail (spin -t -p).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$root/docs/protocol/submission.pml
ticks=${MODEL_TICKS:-2}
planted_bugs=(UNCONDITIONAL_CLAIM NO_RECORD_GUARD SCANCEL_ADOPTED SWEEP_READS_ROW_FIRST)

command -v spin >/dev/null || { echo "model-check: spin is not installed (apt-get install spin)" >&2; exit 2; }
command -v gcc >/dev/null || { echo "model-check: gcc is not installed" >&2; exit 2; }

if [ "${1:-}" = "--planted" ]; then
    status=0
    for bug in "${planted_bugs[@]}"; do
        if out=$("$0" -D "$bug" 2>&1); then
            echo "$out"; echo "model-check: planted bug $bug was NOT caught"; status=1
        else
            echo "model-check: planted bug $bug caught: $(grep -m1 '^VIOLATED:' <<<"$out" || echo '?')"
        fi
    done
    exit $status
fi

defines=()
while [ $# -gt 0 ]; do
    case "$1" in
        -D) defines+=("-D$2"); shift 2 ;;
        *) echo "usage: $0 [--planted | -D BUG ...]" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/model-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
failures=0

# check LABEL EXPECT(holds|violated) PROPERTY(-: the safety monitor) -- SPIN_FLAGS...
check() {
    local label=$1 expect=$2 prop=$3; shift 4
    local dir=$work/$label cc_flags pan_flags out errors name start
    mkdir -p "$dir"; cp "$model" "$dir/submission.pml"
    if [ "$prop" = - ]; then cc_flags=(-DSAFETY -DNOCLAIM); pan_flags=()
    else cc_flags=(-DNFAIR=8); pan_flags=(-a -f -N "$prop"); fi
    start=$(date +%s%N)
    (cd "$dir" && spin "$@" -a submission.pml >spin.out 2>&1 && gcc -O2 -w "${cc_flags[@]}" -o pan pan.c) \
        || { cat "$dir/spin.out"; echo "model-check: $label: could not build the verifier"; failures=$((failures + 1)); return; }
    out=$(cd "$dir" && ./pan -n -m200000 -w24 "${pan_flags[@]}" 2>&1) || true
    errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' <<<"$out" | tail -1)
    local states; states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' <<<"$out" | tail -1)
    local ms=$(( ($(date +%s%N) - start) / 1000000 )) secs; secs=$((ms / 1000)).$((ms % 1000 / 100))
    if grep -q "max search depth too small" <<<"$out"; then
        echo "model-check: $label: search depth too small, the check is incomplete"; failures=$((failures + 1)); return
    fi
    if [ "${errors:-1}" = 0 ]; then
        if [ "$expect" = holds ]; then echo "ok   $label ($states states, ${secs}s)"
        else echo "FAIL $label: expected a violation, found none ($states states)"; failures=$((failures + 1)); fi
        return
    fi
    name=$(sed -n 's/.*assertion violated \([a-z0-9_]*\).*/\1/p' <<<"$out" | head -1)
    [ -n "$name" ] || name=$prop
    echo "VIOLATED: $name ($label, spin $*)"
    if [ "$expect" = violated ]; then
        echo "ok   $label: violated as expected (${secs}s)"
        return
    fi
    echo "--- counterexample (spin -t -p) ---"
    (cd "$dir" && spin "$@" -t -p ${pan_flags[2]:+-N "$prop"} submission.pml 2>&1) || true
    echo "--- end of counterexample for $name ---"
    failures=$((failures + 1))
}

T=-DNTICKS=$ticks
if [ ${#defines[@]} -gt 0 ]; then
    check "safety-with-${defines[*]#-D}" holds - -- "$T" "${defines[@]}"
else
    # Properties 1, 2, 3a, 4, 5: lease honoured, then without the timing assumption.
    check safety holds - -- "$T"
    check safety-lease-can-lapse holds - -- "$T" -DLEASE_CAN_LAPSE
    # Property 3b and 2' under weak fairness, faults stopping for ever after some point.
    check liveness-declared-row-progresses holds p3_declared_row_progresses -- "$T" -DLIVENESS
    check liveness-cancelled-row-eventually-clean holds p2_cancelled_row_eventually_clean -- "$T" -DLIVENESS
    # The strong form of property 2 does not hold: this is why property 2 is the weaker form.
    check strong-quiescence-does-not-hold violated - -- "$T" -DSTRONG_QUIESCENCE
fi

if [ $failures -gt 0 ]; then echo "model-check: $failures check(s) failed"; exit 1; fi
echo "model-check: all checks passed"
