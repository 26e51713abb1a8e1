#!/bin/sh
# Make an out-of-tree source directory for the patched xen-tpmfront:
# xen-tpmfront.c and tpm.h from linux-source-6.1 with this directory's patches
# applied, and a Kbuild. `make -C <headers> M=OUT modules` builds it, and the
# harness takes OUT as `--tpmfront-source OUT`.
#
# usage: make_source.sh OUT [SOURCE]
#
#   OUT     the directory to write (created; an existing one must be empty or
#           hold only what an earlier run of this script wrote)
#   SOURCE  linux-source-6.1 as Debian ships it: the .deb
#           (linux-source-6.1_*_all.deb), the tarball inside it
#           (linux-source-6.1.tar.xz), or an unpacked kernel tree. Default:
#           the newest linux-source-6.1_*.deb in the images' package cache,
#           ${XENVTPM_CACHE:-~/.cache/xenvtpm}/images/debs/.
#
# The patches must apply exactly (no fuzz): a source they were not made for is
# an error, not a guess. Only the two files the module needs are unpacked.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
member_dir=drivers/char/tpm
files="xen-tpmfront.c tpm.h"

die() {
	echo "make_source.sh: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: make_source.sh OUT [SOURCE]"
out=$1
source=${2:-}

if [ -z "$source" ]; then
	debs=${XENVTPM_CACHE:-$HOME/.cache/xenvtpm}/images/debs
	source=$(ls -1 "$debs"/linux-source-6.1_*_all.deb 2>/dev/null |
		sort -V | tail -n 1)
	[ -n "$source" ] || die "no linux-source-6.1 .deb in $debs: give SOURCE"
fi
[ -e "$source" ] || die "$source: no such file or directory"

patches=$(ls -1 "$here"/[0-9][0-9][0-9][0-9]-*.patch 2>/dev/null | sort)
[ -n "$patches" ] || die "no NNNN-*.patch in $here"

work=$(mktemp -d "${TMPDIR:-/tmp}/make_source.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# The two files, at their kernel paths under $work/tree.
mkdir -p "$work/tree/$member_dir"
origin=
case $source in
*.deb)
	version=$(dpkg-deb -f "$source" Version)
	package=$(dpkg-deb -f "$source" Package)
	origin="$package $version"
	dpkg-deb --fsys-tarfile "$source" |
		tar -xf - -C "$work" ./usr/src/linux-source-6.1.tar.xz ||
		die "$source holds no usr/src/linux-source-6.1.tar.xz"
	source=$work/usr/src/linux-source-6.1.tar.xz
	;;
esac
if [ -d "$source" ]; then
	for f in $files; do
		cp "$source/$member_dir/$f" "$work/tree/$member_dir/" ||
			die "$source is no kernel tree (no $member_dir/$f)"
	done
	origin=${origin:-"tree $source"}
else
	top=$(tar -tf "$source" | head -n 1 | cut -d/ -f1)
	members=
	for f in $files; do
		members="$members $top/$member_dir/$f"
	done
	# shellcheck disable=SC2086 # the member names hold no blanks
	tar -xf "$source" -C "$work/tree" --strip-components=1 $members ||
		die "$source lacks $members"
	origin=${origin:-"tarball $(basename "$source")"}
fi

for p in $patches; do
	patch -d "$work/tree" -p1 --batch --forward --fuzz=0 --quiet \
		--no-backup-if-mismatch <"$p" >"$work/patch.log" 2>&1 || {
		cat "$work/patch.log" >&2
		die "$(basename "$p") does not apply to $origin"
	}
done

mkdir -p "$out"
for f in $(ls -A "$out"); do
	case $f in
	xen-tpmfront.c | tpm.h | Kbuild | SOURCE) ;;
	*) die "$out holds $f: give an empty or new directory" ;;
	esac
done
for f in $files; do
	cp "$work/tree/$member_dir/$f" "$out/$f"
done
echo 'obj-m := xen-tpmfront.o' >"$out/Kbuild"
{
	echo "$origin: $member_dir/{$(echo $files | tr ' ' ',')}"
	for p in $patches; do
		echo "$(sha256sum "$p" | cut -c1-16) $(basename "$p")"
	done
} >"$out/SOURCE"
echo "$out: xen-tpmfront.c, tpm.h from $origin" \
	"+ $(echo "$patches" | wc -l) patches, Kbuild"
