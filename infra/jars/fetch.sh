#!/usr/bin/env bash
# Resolve the JARs Spark needs for Delta (pom.xml) into infra/jars/lib/ and
# verify them against jars.sha256. Run by `make jars` (part of `make venv`);
# `make jars JARS_PROFILE=s3` adds the S3A connector (profile s3 of pom.xml).
# Usage: fetch.sh [PROFILE [OUT_DIR]] (OUT_DIR defaults to infra/jars/lib;
# `make jars-s3` puts the S3A set in infra/jars/lib-s3 beside the default one).
#
# Maven: the `mvn` on PATH, else Apache Maven (pinned below, sha512 checked)
# fetched once from Maven Central into infra/jars/.maven/, so a machine with
# only Python and Java can set up. Maven itself checks every artifact against
# the repository's checksums (-C); jars.sha256 pins the exact files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile="${1:-}"
out="$(realpath -m "${2:-$here/lib}")"
MAVEN_VERSION=3.9.11
MAVEN_SHA512=bcfe4fe305c962ace56ac7b5fc7a08b87d5abd8b7e89027ab251069faebee516b0ded8961445d6d91ec1985dfe30f8153268843c89aa392733d1a3ec956c9978
CENTRAL=https://repo1.maven.org/maven2

mvn_bin="$(command -v mvn || true)"
if [ -z "$mvn_bin" ]; then
  mvn_bin="$here/.maven/apache-maven-$MAVEN_VERSION/bin/mvn"
  if [ ! -x "$mvn_bin" ]; then
    echo "no mvn on PATH: fetching Apache Maven $MAVEN_VERSION from Maven Central"
    mkdir -p "$here/.maven"
    tgz="$here/.maven/maven.tar.gz"
    curl -fsSL -o "$tgz" "$CENTRAL/org/apache/maven/apache-maven/$MAVEN_VERSION/apache-maven-$MAVEN_VERSION-bin.tar.gz"
    echo "$MAVEN_SHA512  $tgz" | sha512sum -c --quiet -
    tar -xzf "$tgz" -C "$here/.maven" && rm -f "$tgz"
  fi
fi

# Resolve into a fresh folder, verify, then swap it in: lib/ is either the old
# complete set or the new complete set, never a mix.
tmp="$(dirname "$out")/.lib-$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
"$mvn_bin" -q -B -C -f "$here/pom.xml" ${profile:+-P "$profile"} \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp"

# Every pinned file must be there with its checksum; nothing unpinned may be.
sums="$here/jars.sha256"
[ -n "$profile" ] && sums="$here/jars-$profile.sha256"
(cd "$tmp" && sha256sum -c --quiet "$sums") || {
  echo "infra/jars: resolved JARs differ from $(basename "$sums") (pom.xml changed? regenerate it: see infra/jars/README.md)" >&2
  exit 1
}
extra="$(cd "$tmp" && comm -23 <(ls *.jar | sort) <(awk '{print $2}' "$sums" | sort))"
if [ -n "$extra" ]; then
  echo "infra/jars: JARs not pinned in $(basename "$sums"): $extra" >&2
  exit 1
fi
cp "$sums" "$tmp/jars.sha256"   # what the folder holds, read by the Spark session at start-up
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out: $(ls "$out"/*.jar | wc -l) JARs verified"
