#!/usr/bin/env bash
# Set everything up and run every test, in this order:
#   1. pytest: unit and parity tests (the real-size ones are marked slow and run too)
#   2. nbval: every notebook in book/ re-executed in a fresh kernel, outputs compared
#   3. each notebook's paired py:percent file is in sync with it
#   4. jupyter-book build with warnings as errors (from the outputs nbval just proved current)
#   5. headless Chromium opens every built page and checks it
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=.venv/bin/python

step() { echo; echo "=== $* ==="; }

step "1/5 pytest: unit and parity tests"
$PY -m pytest tests -q -rs

step "2/5 nbval: every notebook, fresh kernel, stored outputs compared"
$PY -m pytest --nbval --nbval-current-env --nbval-sanitize-with book/sanitize.cfg book/ -q

step "3/5 paired py:percent files in sync"
$PY scripts/check_pairing.py

step "4/5 jupyter-book build -W (stored outputs)"
rm -rf _build
sed 's/^  execute_notebooks: .*/  execute_notebooks: "off"/' _config.yml > _config_stored_outputs.yml
trap 'rm -f _config_stored_outputs.yml' EXIT
.venv/bin/jupyter-book build . --all -W -n --keep-going --config _config_stored_outputs.yml

step "5/5 headless Chromium over every built page"
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
$PY scripts/check_pages.py _build/html
