#!/usr/bin/env bash
# Copies a pipeline's results into the results store, so that they appear there whole or not at all.
#
#   datamove.sh SRC_DIR DEST_DIR
#   datamove.sh --files DEST_DIR NAME:SHA256:SOURCE...
#
# The second form copies only the files named, each SOURCE to DEST_DIR/NAME (NAME a relative path),
# and refuses any whose copy does not hash to SHA256 (the checksum recorded when the job that wrote
# it ended): the store gets a request's declared outputs, never whatever else sits beside them.
#
# The copy goes to a temporary directory beside DEST_DIR (same filesystem, so the final rename is
# atomic), gets a checksum manifest (MANIFEST.sha256, `sha256sum -c` format, paths relative to the
# directory) that is verified against the copy, and only then is renamed to DEST_DIR. A reader of the
# store therefore never sees a half-copied result. An existing DEST_DIR is replaced only if its
# manifest differs (a re-run after a crash after the rename is a no-op).
set -euo pipefail

die() { echo "datamove.sh: error: $*" >&2; exit 1; }

files_mode=0
if [ "${1:-}" = "--files" ]; then
    files_mode=1
    shift
    [ $# -ge 1 ] || die "usage: datamove.sh --files DEST_DIR NAME:SHA256:SOURCE..."
    dest=${1%/}
    shift
else
    [ $# -eq 2 ] || die "usage: datamove.sh SRC_DIR DEST_DIR | datamove.sh --files DEST_DIR NAME:SHA256:SOURCE..."
    src=$1
    dest=${2%/}
    [ -d "$src" ] || die "source directory $src does not exist"
fi
[ -n "$dest" ] || die "the destination must not be /"
parent=$(dirname -- "$dest")
name=$(basename -- "$dest")
mkdir -p -- "$parent"

staging=$(mktemp -d -- "$parent/.$name.partial.XXXXXX")
trap 'rm -rf -- "$staging"' EXIT

if [ "$files_mode" = 1 ]; then
    for spec in "$@"; do
        file=${spec%%:*}
        rest=${spec#*:}
        sha=${rest%%:*}
        source=${rest#*:}
        case "$file" in
            ""|/*|..|../*|*/..|*/../*|MANIFEST.sha256) die "refusing the result name '$file' (in '$spec')" ;;
        esac
        [[ "$sha" =~ ^[0-9a-f]{64}$ ]] || die "'$spec' does not give a sha256 for $file"
        [ -f "$source" ] || die "declared output $source does not exist"
        mkdir -p -- "$staging/$(dirname -- "$file")"
        cp -L --preserve=mode,timestamps -- "$source" "$staging/$file" || die "copying $source failed"
        actual=$(sha256sum -- "$staging/$file" | cut -d' ' -f1)
        [ "$actual" = "$sha" ] || die "$source changed after its job ended: sha256 $actual, recorded $sha"
        printf '%s  ./%s\n' "$sha" "$file" >> "$staging/MANIFEST.unsorted"
    done
    touch -- "$staging/MANIFEST.unsorted"
    LC_ALL=C sort -k2 -- "$staging/MANIFEST.unsorted" > "$staging/MANIFEST.sha256"
    rm -f -- "$staging/MANIFEST.unsorted"
else
    # -L: results published as symlinks (Nextflow's publishDir mode 'symlink') point into a work directory
    # that gets cleaned; the store must hold the files themselves.
    cp -RL --preserve=mode,timestamps -- "$src/." "$staging/" || die "copying $src failed"
    rm -f -- "$staging/MANIFEST.sha256"
    # Checksums of the source, checked against the copy: a short or corrupt copy fails here, before the rename.
    (cd -- "$src" && find -L . -type f ! -name MANIFEST.sha256 -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) \
        > "$staging/MANIFEST.sha256"
fi
(cd -- "$staging" && sha256sum --quiet -c MANIFEST.sha256) || die "the copy in $staging does not match its manifest"

if [ -d "$dest" ]; then
    if cmp -s -- "$dest/MANIFEST.sha256" "$staging/MANIFEST.sha256"; then
        echo "datamove.sh: $dest already holds these results ($(wc -l < "$staging/MANIFEST.sha256") files)"
        exit 0
    fi
    # Two renames: DEST_DIR is absent for the instant between them, never half-written; the old copy
    # is deleted only once the new one is in place.
    old=$(mktemp -d -- "$parent/.$name.old.XXXXXX")
    mv -T -- "$dest" "$old/$name"
    mv -T -- "$staging" "$dest"
    rm -rf -- "$old"
else
    mv -T -- "$staging" "$dest"
fi
chmod -R a+rX -- "$dest"
echo "datamove.sh: copied $(wc -l < "$dest/MANIFEST.sha256") files${src:+ from $src} to $dest"
