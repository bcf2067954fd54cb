#!/usr/bin/env bash
# Fresh machine -> .venv with sslab -> pretrain SimCLR on the embedded Fashion-MNIST subset -> results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sslab run "$@"
.venv/bin/sslab results
echo "results store: results/sslab.db  (inspect with: .venv/bin/sslab results --format csv)"
