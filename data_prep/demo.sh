#!/usr/bin/env bash
# `make demo`: dataset conversion -> FastMIM pre-training -> fine-tuning -> top-1, on NUM ranks (default 2).
# With no DATA it first generates a small 10-class synthetic ImageFolder (data_prep/make_synthetic.py), so the whole
# chain runs with no download; DATA=/path/to/imagefolder (train/ and val/ inside) runs the same chain on real images.
set -euo pipefail
DATA="${1:-}"
NUM="${2:-2}"
PY="${PY:-.venv/bin/python}"
PORT="${MASTER_PORT:-29500}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"

if [ -z "$DATA" ]; then
  DATA=data/demo_images
  "$PY" data_prep/make_synthetic.py --out "$DATA"
  OUT=data/demo
else
  OUT="data/demo_$(basename "${DATA%/}")"
fi
if [ ! -f "$OUT/train.beton" ] || [ ! -f "$OUT/val.beton" ]; then
  # exit status 1 = some files were skipped (listed in $OUT/*_skipped.tsv): the demo goes on with the rest
  "$PY" -m fastmim_ds prepare --src "$DATA" --out "$OUT" --max-res 128 || [ $? -eq 1 ]
fi

RUN="$(date +%Y%m%d-%H%M%S)"
PRE=(--config configs/demo_pretrain.yaml --set "data.train=$OUT/train.beton" --set "data.val=$OUT/val.beton"
     --set "train.run_name=$RUN-pretrain")
FT=(--config configs/demo_finetune.yaml --set "data.train=$OUT/train.beton" --set "data.val=$OUT/val.beton"
    --set "train.run_name=$RUN-finetune" --pretrained "output/demo/$RUN-pretrain")
"$PY" -m fastmim_ds check pretrain "${PRE[@]}" --world-size "$NUM"
# the launcher's INFO lines go to output/demo/launcher.log; VERBOSE=1 prints everything
V=(); [ "${VERBOSE:-0}" = 0 ] || V=(--verbose)
LAUNCH=("$PY" -m fastmim_ds.launch "${V[@]}" --log output/demo/launcher.log --
        "$(dirname "$PY")/deepspeed" --num_gpus "$NUM" --master_port "$PORT" --module fastmim_ds)
"${LAUNCH[@]}" pretrain "${PRE[@]}"
"$PY" -m fastmim_ds.quality "output/demo/$RUN-pretrain"  # the last epoch's reconstruction skill, in one line
"${LAUNCH[@]}" finetune "${FT[@]}"
echo "pre-training: output/demo/$RUN-pretrain (metrics.jsonl), fine-tuning: output/demo/$RUN-finetune"
