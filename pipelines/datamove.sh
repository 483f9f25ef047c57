#!/usr/bin/env bash
# Copies a pipeline's results into the results store, so that they appear there whole or not at all.
#
#   datamove.sh SRC_DIR DEST_DIR
#
# The copy goes to a temporary directory beside DEST_DIR (same filesystem, so the final rename is
# atomic), gets a checksum manifest (MANIFEST.sha256, `sha256sum -c` format, paths relative to the
# directory) that is verified against the copy, and only then is renamed to DEST_DIR. A reader of the
# store therefore never sees a half-copied result. An existing DEST_DIR is replaced only if its
# manifest differs (a re-run after a crash after the rename is a no-op).
set -euo pipefail

die() { echo "datamove.sh: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: datamove.sh SRC_DIR DEST_DIR"
src=$1
dest=${2%/}
[ -d "$src" ] || die "source directory $src does not exist"
[ -n "$dest" ] || die "the destination must not be /"
parent=$(dirname -- "$dest")
name=$(basename -- "$dest")
mkdir -p -- "$parent"

staging=$(mktemp -d -- "$parent/.$name.partial.XXXXXX")
trap 'rm -rf -- "$staging"' EXIT

# -L: results published as symlinks (Nextflow's publishDir mode 'symlink') point into a work directory
# that gets cleaned; the store must hold the files themselves.
cp -RL --preserve=mode,timestamps -- "$src/." "$staging/" || die "copying $src failed"
rm -f -- "$staging/MANIFEST.sha256"
# Checksums of the source, checked against the copy: a short or corrupt copy fails here, before the rename.
(cd -- "$src" && find -L . -type f ! -name MANIFEST.sha256 -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) \
    > "$staging/MANIFEST.sha256"
(cd -- "$staging" && sha256sum --quiet -c MANIFEST.sha256) || die "the copy in $staging does not match $src"

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
echo "datamove.sh: copied $(wc -l < "$dest/MANIFEST.sha256") files from $src to $dest"
