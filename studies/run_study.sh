#!/usr/bin/env bash
# The pre-training study of the README ("Does pre-training pay?"), one command per row:
#   studies/run_study.sh pretrain hog|pixel      FastMIM pre-training (configs/study/pretrain_<target>.yaml), resumable
#   studies/run_study.sh eval scratch|hog|pixel  k-NN, linear probe, fine-tuning at 10 % and 100 % of the labels
#   studies/run_study.sh curves hog|pixel        skill ratio at the initialisation and every checkpoint (KNN=1: k-NN too)
# Runs go to $RUNS (default ~/runs/study, outside the work tree); the small raw results (JSON/JSONL) to
# studies/results/<row>/. Every step skips what is already done, so the script can be re-run after an interruption.
# One process per command (1 CPU rank); THREADS sets torch's threads (default 1: two rows run side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUNS="${RUNS:-$HOME/runs/study}"
DATA="${DATA:-data/imagenette128}"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${THREADS:-1}"
export MASTER_PORT="${MASTER_PORT:-$((29650 + RANDOM % 200))}"
what="$1" row="$2"
res="studies/results/$row"
mkdir -p "$res"
data=(--set "data.train=$DATA/train.beton" --set "data.val=$DATA/val.beton")

run() {  # run <name> <command> <config> <pretrained>: one classifier run, its metrics copied into the results
  local name="$1" cmd="$2" cfg="$3" pre="$4"
  "$PY" -m fastmim_ds "$cmd" --config "$cfg" --pretrained "$pre" "${data[@]}" --set "train.output_dir=$RUNS" \
    --set "train.run_name=${row}_$name" --resume auto
  cp "$RUNS/${row}_$name/metrics.jsonl" "$res/$name.jsonl"
  cp "$RUNS/${row}_$name/config.yaml" "$res/$name.config.yaml"
}

case "$what" in
  pretrain)
    "$PY" -m fastmim_ds pretrain --config "configs/study/pretrain_$row.yaml" --set "data.train=$DATA/train.beton" \
      --set "train.output_dir=$RUNS" --set "train.run_name=pretrain_$row" --resume auto
    cp "$RUNS/pretrain_$row/metrics.jsonl" "$res/pretrain.jsonl"
    cp "$RUNS/pretrain_$row/config.yaml" "$res/pretrain.config.yaml" ;;
  eval)
    # the scratch row starts every evaluation from the initialisation the pre-training runs started from
    if [ "$row" = scratch ]; then src=configs/study/pretrain_hog.yaml; else src="$RUNS/pretrain_$row"; fi
    [ -f "$res/knn.json" ] || "$PY" -m fastmim_ds knn "$src" --train "$DATA/train.beton" --val "$DATA/val.beton" \
      --img-size 64 --json "$res/knn.json"
    run linprobe linprobe configs/study/linprobe.yaml "$src"
    run finetune_10pct finetune configs/study/finetune_10pct.yaml "$src"
    run finetune finetune configs/study/finetune.yaml "$src" ;;
  curves)
    "$PY" studies/curves.py "$RUNS/pretrain_$row" "configs/study/pretrain_$row.yaml" --val "$DATA/val.beton" \
      --bank-images 3157 ${KNN:+--knn} --out "$res/curve.jsonl" ;;
  *) echo "usage: $0 pretrain|eval|curves <row>" >&2; exit 2 ;;
esac
