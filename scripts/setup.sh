#!/usr/bin/env bash
# Create .venv and install sslab with its test tools; does nothing when pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.sslab-installed
wanted=$(sha256sum pyproject.toml | cut -c1-64)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing sslab and its dependencies into .venv (torch comes from local disk where it lies there)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  echo "$wanted" > "$stamp"
fi
