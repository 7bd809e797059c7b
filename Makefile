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

CONFIG     ?= configs/fastmim_vit_base_128_800ep.yaml
FT_CONFIG  ?= configs/finetune_vit_base_224_100ep.yaml
SET        ?=
RESUME     ?=
PRETRAINED ?=
OUTPUT_DIR ?=
# Dataset conversion
IMAGENET   ?=
SRC        ?=
OUT        ?= data/$(notdir $(patsubst %/,%,$(SRC)))
MAX_RES    ?= 256
JPEG_QUALITY ?= 90
WRITE_MODE ?= jpg
# `make demo` runs on a generated dataset unless DATA points at an ImageFolder (train/ and val/ inside).
DATA       ?=

LAUNCH = $(VENV)/bin/deepspeed $(if $(HOSTFILE),--hostfile $(HOSTFILE),--num_gpus $(NUM_GPUS)) --master_port $(MASTER_PORT) --module fastmim_ds
OVERRIDES = $(foreach s,$(SET),--set $(s)) $(if $(OUTPUT_DIR),--set train.output_dir=$(OUTPUT_DIR))

.PHONY: help install test test-gpu lint demo prepare-imagenet prepare-data pretrain finetune clean

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
	$(PY) -m ruff check fastmim_ds tests data_prep benchmarks

demo:  ## whole chain (convert -> pre-train -> fine-tune) on 2 CPU/GPU ranks; DATA=/imagefolder for real images
	bash data_prep/demo.sh "$(DATA)" "$(NUM_GPUS)"

prepare-imagenet:  ## IMAGENET=/path/to/ILSVRC (with train/ and val/ class folders) -> data/imagenet/{train,val}.beton
	@test -n "$(IMAGENET)" || { echo "error: set IMAGENET=/path/to/imagenet (folder with train/ and val/)"; exit 2; }
	$(CLI) prepare --src $(IMAGENET) --out $(if $(filter data/,$(OUT)),data/imagenet,$(OUT)) --max-res $(MAX_RES) --jpeg-quality $(JPEG_QUALITY) --write-mode $(WRITE_MODE)

prepare-data:  ## SRC=/any/imagefolder OUT=data/name -> OUT/{train,val}.beton
	@test -n "$(SRC)" || { echo "error: set SRC=/path/to/imagefolder (folder with train/ and val/)"; exit 2; }
	$(CLI) prepare --src $(SRC) --out $(OUT) --max-res $(MAX_RES) --jpeg-quality $(JPEG_QUALITY) --write-mode $(WRITE_MODE)

pretrain:  ## CONFIG=configs/....yaml SET="k=v ..." NUM_GPUS=8 [HOSTFILE=hosts] [RESUME=auto]
	$(CLI) check pretrain --config $(CONFIG) $(OVERRIDES) --world-size $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE))
	$(LAUNCH) pretrain --config $(CONFIG) $(OVERRIDES) $(if $(RESUME),--resume $(RESUME))

finetune:  ## PRETRAINED=<run dir or checkpoint> FT_CONFIG=configs/....yaml SET="k=v ..."
	$(CLI) check finetune --config $(FT_CONFIG) $(OVERRIDES) --world-size $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(if $(PRETRAINED),--pretrained $(PRETRAINED))
	$(LAUNCH) finetune --config $(FT_CONFIG) $(OVERRIDES) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(RESUME),--resume $(RESUME))

clean:
	rm -rf .pytest_cache build *.egg-info
