#!/usr/bin/env bash
# Installs mergekit into its own venv, bench/.venv-mergekit (gitignored): its pins conflict with
# graftcore's venv. torch is pinned to the CPU build already on this machine so pip does not pull a
# multi-GB CUDA wheel. bench_merge.py finds bench/.venv-mergekit/bin/mergekit-yaml by itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-mergekit"
python3 -m venv "$venv"
"$venv/bin/pip" install -q 'torch==2.13.0' "mergekit${MERGEKIT_VERSION:+==$MERGEKIT_VERSION}"
"$venv/bin/mergekit-yaml" --help > /dev/null
echo "mergekit $("$venv/bin/pip" show mergekit | awk '/^Version/{print $2}') installed in $venv" >&2
