# make demo : venv + install + the whole pipeline on the offline toy world
# make test : venv + install + the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOY ?= toy
RUN ?= runs/demo
# One thread per process keeps the 2-core CI box predictable; on a GPU node torch ignores this for kernels.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# No GPU here: take the small CPU wheel first, so requirements.txt does not pull the CUDA build.
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/pip install -q "torch==2.13.0" || \
	  $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -r requirements.txt pytest
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python 00_make_toy.py --out $(TOY)
	$(BIN)/python 01_build_pairs.py --model $(TOY)/model --data toy=$(TOY)/train.json --image_root $(TOY)/images \
	  --out $(RUN)/pairs_weakened.jsonl --noise_step 500 --max_new_tokens 48 --batch_size 32
	$(BIN)/python 03_train_bpo.py --model $(TOY)/model --data $(RUN)/pairs_weakened.jsonl --image_root $(TOY)/images \
	  --output_dir $(RUN)/bpo --lr 1e-4 --epochs 2 --batch_size 16 --lora_r 16 --lora_alpha 32 --save_every 0 --seed 0
	@echo "toy world: $(TOY)/   pairs: $(RUN)/pairs_weakened.jsonl   BPO run: $(RUN)/bpo/ (metrics.jsonl, curves.png, adapter/)"

clean:
	rm -rf $(TOY) runs
