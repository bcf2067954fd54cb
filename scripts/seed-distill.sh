#!/usr/bin/env bash
# studies/seed-distill.toml in its two stages: (1) the teacher, a ResNet-18 trained by SimCLR on the study's
# data (a finished teacher is answered from the results store), then (2) the study, whose seed and distill
# students learn from it, given as --set teacher=<the teacher's config hash>.
#   SSLAB_DATA=../shared/data bash scripts/seed-distill.sh [--set key=value ...]
# Extra --set options apply to both stages, so that teacher and students see the same data (the tests run it
# on the embedded data at a tiny scale); the students' epochs are the study's, the teacher's
# TEACHER_EPOCHS (default 4). SSLAB_WORKERS: study workers (default 2); SSLAB_DB and SSLAB_WEIGHTS_DIR as
# for sslab itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sslab=${SSLAB:-$root/.venv/bin/sslab}
python=${SSLAB_PYTHON:-$root/.venv/bin/python}

teacher=(--set method=simclr --set backbone=resnet18 --set dataset=cifar10 --set train_subset=20000
  --set batch_size=256 --set precision=bf16 --set "epochs=${TEACHER_EPOCHS:-4}" "$@")
"$sslab" run "${teacher[@]}"
hash=$("$python" - "${teacher[@]}" <<'PY'
import sys

from sslab.config import from_sources

args = sys.argv[1:]
print(from_sources(sets=[args[i + 1] for i, arg in enumerate(args) if arg == "--set"]).hash())
PY
)
echo "teacher: trial $hash" >&2
"$sslab" study run seed-distill --set "teacher=$hash" "$@" --workers "${SSLAB_WORKERS:-2}"
"$sslab" results --study seed-distill
