#!/usr/bin/env bash
# Prepare a fresh Debian machine for cpmproxy's demo, tests and benchmarks:
# Debian's Dovecot and isync (mbsync) if missing, then a virtualenv with the project and its test deps.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dovecot >/dev/null 2>&1 || need_apt+=(dovecot-imapd)
command -v mbsync >/dev/null 2>&1 || need_apt+=(isync)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: please install ${need_apt[*]} (apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Editable "compat" install puts the checkout on sys.path, so `twist cpmproxy` finds twisted/plugins/.
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" --config-settings editable_mode=compat
