#!/usr/bin/env bash
# The SimCLR ablations on CIFAR-10 at 2-core CPU scale (docs/reproductions.md): runs each study (finished
# trials are skipped, so a rerun only redraws), then writes its figures, tables and CSVs to results/.
#   SSLAB_DATA=../shared/data bash scripts/reproduce-cifar10.sh [STUDY ...]
# STUDY: aug-pairs temperature color-strength methods head batch-size, then the follow-ups aug-pairs-nobase
# (the grid without the shared base crop) aug-pairs-color1 (that grid at colour strength 1)
# color-strength-budget batch-size-budget head-budget aug-pairs-seeds (longer training, more seeds);
# default: all, in that order.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sslab=.venv/bin/sslab
cpu_scale=(--set dataset=cifar10 --set train_subset=20000 --set precision=bf16)
workers=(--workers "${SSLAB_WORKERS:-2}")

study() {  # NAME PRESET [extra study-run options]: run PRESET at CIFAR-10 CPU scale, recorded as NAME
  local name=$1 preset=$2
  shift 2
  local start=$SECONDS
  "$sslab" study run "$preset" --name "$name" "$@" "${workers[@]}"  # failed trials are recorded, not fatal
  echo "$name: $((SECONDS - start)) s wall-clock" >&2
  "$sslab" results --study "$name" --format csv > "results/$name-trials.csv"
}

all="aug-pairs temperature color-strength methods head batch-size aug-pairs-nobase aug-pairs-color1"
all+=" color-strength-budget"
all+=" batch-size-budget head-budget aug-pairs-seeds"

run_one() {
  case $1 in
    aug-pairs)
      study aug-pairs-cifar10 aug-pairs-cifar10
      $sslab report heatmap aug-pairs-cifar10 --out results/aug-pairs-cifar10.png ;;
    temperature)
      study temperature-cifar10 temperature "${cpu_scale[@]}" --seeds 0,1
      $sslab report table temperature-cifar10 --rows temperature --cols normalize -f csv \
        -o results/temperature-cifar10.csv
      $sslab report table temperature-cifar10 --rows temperature --cols normalize -f markdown \
        -o results/temperature-cifar10.md ;;
    color-strength)
      study color-strength-cifar10 color-strength "${cpu_scale[@]}" --seeds 0,1
      $sslab report bars color-strength-cifar10 --x strength --hue method \
        --out results/color-strength-cifar10.png ;;
    methods)
      study methods-cifar10 methods "${cpu_scale[@]}" --seeds 0
      $sslab report bars methods-cifar10 --x method --out results/methods-cifar10.png ;;
    head)
      study head-cifar10 head "${cpu_scale[@]}"
      $sslab report curve head-cifar10 --x out_dim --hue head --out results/head-cifar10-h.png
      $sslab report curve head-cifar10 --x out_dim --hue head --metric linear_top1_z \
        --out results/head-cifar10-z.png ;;
    batch-size)
      study batch-size-cifar10 batch-size "${cpu_scale[@]}"
      $sslab report bars batch-size-cifar10 --x batch_size --hue epochs \
        --out results/batch-size-cifar10.png ;;
    aug-pairs-nobase)
      study aug-pairs-nobase-cifar10 aug-pairs-nobase-cifar10
      $sslab report heatmap aug-pairs-nobase-cifar10 --out results/aug-pairs-nobase-cifar10.png ;;
    aug-pairs-color1)
      study aug-pairs-color1-cifar10 aug-pairs-color1-cifar10
      $sslab report heatmap aug-pairs-color1-cifar10 --out results/aug-pairs-color1-cifar10.png ;;
    head-budget)
      study head-budget-cifar10 head-budget-cifar10
      $sslab report bars head-budget-cifar10 --x head --hue epochs --out results/head-budget-cifar10.png ;;
    color-strength-budget)
      study color-strength-budget-cifar10 color-strength-budget-cifar10
      $sslab report bars color-strength-budget-cifar10 --x strength --hue epochs \
        --out results/color-strength-budget-cifar10.png ;;
    batch-size-budget)
      study batch-size-budget-cifar10 batch-size-budget-cifar10
      $sslab report curve batch-size-budget-cifar10 --x epochs --hue batch_size \
        --out results/batch-size-budget-cifar10.png ;;
    aug-pairs-seeds)
      study aug-pairs-seeds-cifar10 aug-pairs-seeds-cifar10
      $sslab report bars aug-pairs-seeds-cifar10 --x pair --hue epochs \
        --out results/aug-pairs-seeds-cifar10.png ;;
    *) echo "unknown study '$1'; choose from: $all" >&2
       exit 2 ;;
  esac
}

for name in "${@:-$all}"; do
  for one in $name; do run_one "$one"; done
done
