#!/usr/bin/env bash
# sslab's measurements on one GPU machine (sized for one H200), every number written under $OUT:
#   env         the interpreter, torch, GPU and missing packages; the dataset (CIFAR-10, else synthetic)
#   cuda_tests  the CUDA-only tests (files that check torch.cuda.is_available, tests selected by -k cuda)
#   peer        benchmarks/peer_pipeline.py: SimCLR ResNet-18 (CIFAR stem), batch 512, bf16, sslab's
#               on-device views against the per-image DataLoader pipeline, alternating rounds
#   run         one short end-to-end trial with its probes (`sslab run`, 1 epoch of 20,000 images)
#   results     `sslab results --format csv` of that trial
# then benchmarks/gpu_report.py gathers them into $OUT/summary.json.
#
#   bash benchmarks/gpu.sh                            # CUDA, writes ./results/gpu
#   OUT=/tmp/gpu bash benchmarks/gpu.sh --device cpu --tiny   # the same steps at tiny settings on a CPU
#
# Each step has its own timeout, so a hang costs that step alone; on CUDA the timeouts (the summary's
# included) add up to 7m35s, 7m47s with the grace before a kill. A failed step is reported and the script
# goes on; it exits 1 if any step failed.
# Environment: OUT (default ./results/gpu), PYTHON (default .venv/bin/python if there, else python3),
# SSLAB_DATA (where CIFAR-10 is; default ../shared/data beside the checkout; synthetic 32-px images when
# it is absent, which the output and summary.json say).
# Outputs, replaced by each run: summary.json, env.json, peer.json, results.csv, gpu.db, steps.tsv and
# log.txt (every step's output).
set -uo pipefail

DEVICE=cuda
TINY=0
while (($#)); do
    case $1 in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        --tiny) TINY=1; shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (use --device cuda|cpu, --tiny)" >&2; exit 2 ;;
    esac
done
case $DEVICE in cuda | cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "${OUT:=results/gpu}" && OUT=$(cd "$OUT" && pwd) || exit 2
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
DATA=${SSLAB_DATA:-$ROOT/../shared/data}
[[ $DATA == /* ]] || DATA=$PWD/$DATA # the steps run elsewhere (below)
[[ -z ${SSLAB_DATA:-} ]] || export SSLAB_DATA=$DATA
[[ $PYTHON != */* || $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON
WORK=$(mktemp -d) || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 2 # `sslab run` keeps checkpoints and weights under ./results: here, not in the checkout
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SSLAB_WEIGHTS_DIR=$WORK/weights
SSLAB=("$PYTHON" -c 'import sys; from sslab.cli import main; sys.argv[0] = "sslab"; main()')
LOG=$OUT/log.txt
STEPS=$OUT/steps.tsv
DB=sqlite:///$OUT/gpu.db
rm -f "$LOG" "$STEPS" "$OUT/summary.json" "$OUT/env.json" "$OUT/peer.json" "$OUT/results.csv" "$OUT/gpu.db"
FAILED=()

# step NAME TIMEOUT COMMAND...: run COMMAND under its own timeout, timed by the `time` builtin; its output
# goes to log.txt (stdout to $STEP_STDOUT instead when set), its exit status and seconds to steps.tsv.
step() {
    local name=$1 limit=$2 rc seconds
    shift 2
    printf '\n===== %s (timeout %s s): %s\n' "$name" "$limit" "$*" >>"$LOG"
    echo "[$name] running (timeout ${limit} s)"
    local TIMEFORMAT=%R
    { time timeout -k 2 "$limit" "$@" >>"${STEP_STDOUT:-$LOG}" 2>>"$LOG"; } 2>"$WORK/$name.time"
    rc=$?
    seconds=$(tail -n 1 "$WORK/$name.time")
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" "${STEP_MODE:-}" >>"$STEPS"
    printf '===== %s: exit %s after %s s\n' "$name" "$rc" "$seconds" >>"$LOG"
    if ((rc != 0)); then
        FAILED+=("$name")
        echo "[$name] FAILED with exit $rc after ${seconds} s; its output is in $LOG"
    else
        echo "[$name] ok, ${seconds} s"
    fi
    return "$rc"
}

if ((TINY)); then
    WANT=synthetic
    T_ENV=60 T_TESTS=60 T_PEER=120 T_RUN=120 T_RESULTS=30
    MODEL=(--backbone smallcnn --batch-size 32 --precision fp32)
    PEER=(--workers 1 --steps 2 --rounds 2)
    SUBSET=256
else
    WANT=cifar10
    T_ENV=90 T_TESTS=60 T_PEER=130 T_RUN=140 T_RESULTS=20 # and 15 s for the summary: 455 s
    MODEL=(--backbone resnet18 --batch-size 512 --precision bf16)
    PEER=(--steps 40 --rounds 3)
    SUBSET=20000
fi

step env "$T_ENV" "$PYTHON" "$ROOT/benchmarks/gpu_report.py" env \
    --dataset "$WANT" --data-dir "$DATA" --device "$DEVICE" --out "$OUT/env.json"
# the dataset env chose, and the folder it was found in (empty: found where sslab looks by itself)
CHOSEN=$("$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1]))["dataset"]
print(d["name"], d.get("data_dir") or "", sep="\t")' "$OUT/env.json" 2>/dev/null) || CHOSEN=synthetic
IFS=$'\t' read -r DATASET FOUND_IN <<<"$CHOSEN"
if [[ $WANT != "$DATASET" ]]; then
    echo "NOTE: $WANT is not available (see env.json); measuring on synthetic 32-px images instead"
fi
DATA_ARGS=()
[[ -z ${FOUND_IN:-} ]] || DATA_ARGS=(--data-dir "$FOUND_IN")

mapfile -t CUDA_FILES < <(grep -l "cuda.is_available" "$ROOT"/tests/test_*.py)
if ((${#CUDA_FILES[@]} == 0)); then
    echo "NOTE: no test file checks torch.cuda.is_available; no CUDA-only tests to run"
elif [[ $DEVICE == cuda ]]; then
    step cuda_tests "$T_TESTS" env -C "$ROOT" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda "${CUDA_FILES[@]}"
else # no GPU: only check that the selection finds the CUDA tests
    STEP_MODE=collect-only step cuda_tests "$T_TESTS" env -C "$ROOT" \
        "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only -k cuda "${CUDA_FILES[@]}"
fi

step peer "$T_PEER" "$PYTHON" "$ROOT/benchmarks/peer_pipeline.py" --method simclr "${MODEL[@]}" \
    --device "$DEVICE" --dataset "$DATASET" "${DATA_ARGS[@]}" "${PEER[@]}" --json "$OUT/peer.json"

RUN_DATA=(--dataset "$DATASET" "${DATA_ARGS[@]}")
[[ $DATASET == synthetic && $TINY == 0 ]] || RUN_DATA+=(--train-subset "$SUBSET") # synthetic: 1,000 images
step run "$T_RUN" "${SSLAB[@]}" run --method simclr "${MODEL[@]}" "${RUN_DATA[@]}" --epochs 1 \
    --device "$DEVICE" --db "$DB"

STEP_STDOUT=$OUT/results.csv step results "$T_RESULTS" "${SSLAB[@]}" results --format csv --all --db "$DB"

SIZE=()
((TINY)) && SIZE=(--tiny)
timeout -k 2 15 "$PYTHON" "$ROOT/benchmarks/gpu_report.py" summary --out "$OUT" --device "$DEVICE" \
    "${SIZE[@]}" || FAILED+=(summary)
echo "summary: $OUT/summary.json"
if ((${#FAILED[@]})); then
    echo "failed steps: ${FAILED[*]}"
    exit 1
fi
