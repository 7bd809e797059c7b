# fastmim-ds: dataset conversion, pre-training, fine-tuning, tests.
# Every target is a thin wrapper around `fastmim-ds <command>`; variables below are the knobs.
SHELL := /bin/bash
VENV       ?= .venv
PY         := $(VENV)/bin/python
CLI        := $(PY) -m fastmim_ds
# Ranks per node (GPUs, or CPU processes when no GPU is present) and an optional multi-node hostfile.
NUM_GPUS   ?= 2
HOSTFILE   ?=
MASTER_PORT ?= 29500
# CPU machines get DeepSpeed's CPU accelerator (gloo); GPU machines keep the default (cuda, nccl).
DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export DS_ACCELERATOR

# METHOD picks the default recipes (fastmim: ViT-B 128 px; mixmim: MixMIM-B 224 px); CONFIG/FT_CONFIG override them.
METHOD     ?= fastmim
CONFIG     ?= $(if $(filter mixmim,$(METHOD)),configs/mixmim_base_224_600ep.yaml,configs/fastmim_vit_base_128_800ep.yaml)
FT_CONFIG  ?= $(if $(filter mixmim,$(METHOD)),configs/finetune_mixmim_base_224_100ep.yaml,configs/finetune_vit_base_224_100ep.yaml)
LP_CONFIG  ?= configs/linprobe_vit_base_224_90ep.yaml
SET        ?=
RESUME     ?=
PRETRAINED ?=
# export / visualize / predict: CKPT = run folder or checkpoint tag
CKPT       ?=
EXPORT     ?= model.safetensors
IMAGES     ?=
VIS_OUT    ?= reconstructions.png
OUTPUT_DIR ?=
# Dataset conversion
IMAGENET   ?=
SRC        ?=
OUT        ?= data/$(notdir $(patsubst %/,%,$(SRC)))
MAX_RES    ?= 256
JPEG_QUALITY ?= 90
WRITE_MODE ?= jpg
WORKERS    ?= -1
# extra `fastmim-ds prepare` flags: --unlabeled, --val-fraction F, --val-labels FILE, --image-column C, --label-column C
PREP_ARGS  ?=
# `make demo` runs on a generated dataset unless DATA points at an ImageFolder (train/ and val/ inside).
DATA       ?=

# Quiet by default: the deepspeed launcher's INFO lines go to LAUNCH_LOG (fastmim_ds/launch.py); VERBOSE=1 prints
# everything (launcher lines, DeepSpeed's notices, every repetition of a warning).
VERBOSE    ?=
LAUNCH_LOG ?= $(or $(OUTPUT_DIR),output)/launcher.log
LAUNCH = $(PY) -m fastmim_ds.launch $(if $(filter-out 0,$(VERBOSE)),--verbose) --log $(LAUNCH_LOG) -- $(VENV)/bin/deepspeed $(if $(HOSTFILE),--hostfile $(HOSTFILE),--num_gpus $(NUM_GPUS)) --master_port $(MASTER_PORT) --module fastmim_ds
OVERRIDES = $(foreach s,$(SET),--set $(s)) $(if $(OUTPUT_DIR),--set train.output_dir=$(OUTPUT_DIR))

.PHONY: help install test test-gpu lint demo study prepare-imagenet prepare-data pretrain finetune linprobe export visualize bench gpu-check clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install:  ## create .venv, install FFCV's system libraries (apt) and the project with test extras
	bash .ci/install_system_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import torch, timm, deepspeed, ffcv; print('torch', torch.__version__, '| timm', timm.__version__, '| deepspeed', deepspeed.__version__)"

test:  ## run the CPU test suite (DeepSpeed + FFCV end-to-end included)
	DS_ACCELERATOR=cpu $(PY) -m pytest tests -q

test-gpu:  ## tests that need CUDA
	$(PY) -m pytest tests -q -m gpu

lint:
	$(PY) -m ruff check fastmim_ds tests data_prep benchmarks studies

demo:  ## whole chain (convert -> pre-train -> fine-tune) on 2 CPU/GPU ranks; DATA=/imagefolder for real images
	VERBOSE="$(filter-out 0,$(VERBOSE))" bash data_prep/demo.sh "$(DATA)" "$(NUM_GPUS)"

prepare-imagenet:  ## IMAGENET=folder: official tars + devkit, Kaggle layout, train/val class folders, flat val + labels, HF shards -> data/imagenet/
	@test -n "$(IMAGENET)" || { echo "error: set IMAGENET=/path/to/imagenet (the ILSVRC2012 tars + devkit, Kaggle's ILSVRC/ + LOC_val_solution.csv, train/ + val/, or Hugging Face shards)"; exit 2; }
	$(CLI) prepare --src $(IMAGENET) --out $(if $(filter data/,$(OUT)),data/imagenet,$(OUT)) --max-res $(MAX_RES) --jpeg-quality $(JPEG_QUALITY) --write-mode $(WRITE_MODE) --workers $(WORKERS) $(PREP_ARGS)

prepare-data:  ## SRC=/any/images OUT=data/name [PREP_ARGS=--unlabeled] -> OUT/{train,val}.beton (layout detected)
	@test -n "$(SRC)" || { echo "error: set SRC=/path/to/images (ImageFolder, a folder of unlabeled images, a Hugging Face dataset, ...)"; exit 2; }
	$(CLI) prepare --src $(SRC) --out $(OUT) --max-res $(MAX_RES) --jpeg-quality $(JPEG_QUALITY) --write-mode $(WRITE_MODE) --workers $(WORKERS) $(PREP_ARGS)

pretrain:  ## CONFIG=configs/....yaml SET="k=v ..." NUM_GPUS=8 [HOSTFILE=hosts] [RESUME=auto]
	$(CLI) check pretrain --config $(CONFIG) $(OVERRIDES) --world-size $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE))
	$(LAUNCH) pretrain --config $(CONFIG) $(OVERRIDES) $(if $(RESUME),--resume $(RESUME))

finetune:  ## PRETRAINED=<run dir or checkpoint> FT_CONFIG=configs/....yaml SET="k=v ..."
	$(CLI) check finetune --config $(FT_CONFIG) $(OVERRIDES) --world-size $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(if $(PRETRAINED),--pretrained $(PRETRAINED))
	$(LAUNCH) finetune --config $(FT_CONFIG) $(OVERRIDES) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(RESUME),--resume $(RESUME))

linprobe:  ## PRETRAINED=<run dir or checkpoint> LP_CONFIG=configs/linprobe_....yaml SET="k=v ..."
	$(CLI) check linprobe --config $(LP_CONFIG) $(OVERRIDES) --world-size $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(if $(PRETRAINED),--pretrained $(PRETRAINED))
	$(LAUNCH) linprobe --config $(LP_CONFIG) $(OVERRIDES) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(RESUME),--resume $(RESUME))

export:  ## CKPT=<run dir or checkpoint> EXPORT=model.safetensors (or a folder): timm weights + pretrained_cfg
	@test -n "$(CKPT)" || { echo "error: set CKPT=output/<run> (a run folder or checkpoint tag)"; exit 2; }
	$(CLI) export $(CKPT) --out $(EXPORT)

visualize:  ## CKPT=<pre-training run> IMAGES=<folder> VIS_OUT=grid.png: input | masked | target | prediction
	@test -n "$(CKPT)" -a -n "$(IMAGES)" || { echo "error: set CKPT=output/<pre-training run> IMAGES=<folder>"; exit 2; }
	$(CLI) visualize $(CKPT) --images $(IMAGES) --out $(VIS_OUT)

# `make bench`: CPU (~15 min on 2 cores); BENCH_DEVICE=cuda on a GPU machine adds its numbers to the same report.
BENCH_DEVICE ?= $(if $(filter cuda,$(DS_ACCELERATOR)),cuda,cpu)

bench:  ## speed benchmarks -> benchmarks/RESULTS.md + PNG plots (loader, step cost, utilisation, ZeRO memory, scaling)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.run_all --device $(BENCH_DEVICE)

# `make gpu-check`: <= 6 min on one GPU -> results/cuda/*.json + REPORT.md; GPU_CHECK_ARGS="--device cpu --dry-run"
# runs every stage with tiny sizes on the CPU (results/cpu-dry/).
GPU_CHECK_ARGS ?= --device cuda

gpu-check:  ## one-GPU check: bf16 peak, ViT-B step, FFCV to GPU, ZeRO-2 vs 0 memory, 2-min imagenette run -> results/cuda/
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

study:  ## the pre-training study on imagenette (README "Does pre-training pay?"): ~3 h on 2 CPU cores; RUNS=~/runs/study
	@test -f data/imagenette128/train.beton || $(CLI) prepare --src $(or $(SRC),../shared/datasets/imagenette2-224) --out data/imagenette128 --max-res 128
	studies/run_study.sh pretrain hog & studies/run_study.sh pretrain pixel & wait
	studies/run_study.sh curves hog && studies/run_study.sh curves pixel
	studies/run_study.sh eval scratch & studies/run_study.sh eval hog & studies/run_study.sh eval pixel & wait
	$(PY) studies/table.py

clean:
	rm -rf .pytest_cache build *.egg-info
