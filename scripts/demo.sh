#!/usr/bin/env bash
# Fresh machine -> .venv with sslab -> a small augmentation-pair study (SimCLR Fig. 5 in miniature) on the
# embedded Fashion-MNIST subset -> heatmap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sslab study run aug-pairs-mini "$@"
.venv/bin/sslab report heatmap aug-pairs-mini --out results/aug-pairs-mini.png
echo "heatmap: results/aug-pairs-mini.png (numbers beside it in results/aug-pairs-mini.csv)"
