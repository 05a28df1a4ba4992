# make demo     : venv + install + the whole pipeline on the offline toy world (ARCH=MODEL_TYPE: on a tiny model of another
#                 family: llava_next, qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3; docs/other_models.md)
# make test     : venv + install + the full test suite (what CI runs)
# make test-fast: the pure tests (math, objectives, scoring, study rules, I/O), no toy world: seconds
# make study: venv + install + the toy-world study of the paper's claims -> results/STUDY.md (two toy worlds, dev split,
#             rules fixed in experiments/rules.py; resumable)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the model family of make demo's toy world: llava (LLaVA-1.5, the paper's) or another family's model_type
ARCH ?= llava
TOY ?= $(if $(filter llava,$(ARCH)),toy,toy_$(ARCH))
RUN ?= $(if $(filter llava,$(ARCH)),runs/demo,runs/demo_$(ARCH))
# more flags for 00_make_toy.py (e.g. --align_steps N)
TOY_BUILD ?=
# Training settings for the 1M-parameter toy (the scripts' defaults are the paper's, for the 7B model): the study's
# run (80 steps of 16 pairs) and the learning rates its dev split chose (results/dev_selection.json: DPO 1e-4 at
# step 40, SFT 1e-3 at step 80; the demo runs both 80 steps)
TOY_TRAIN ?= --max_steps 80 --batch_size 16 --lora_r 16 --lora_alpha 32 --save_every 0 --seed 0 --overwrite
TOY_DPO_LR ?= 1e-4
TOY_SFT_LR ?= 1e-3
# The toy's features are weakened less per step than CLIP's are in the paper: 500 barely moves its captions
# (docs/toy_world.md)
TOY_NOISE ?= 700
TOY_PAIRS ?= 600
# CPU threads per process (the toy runs on CPU; GPU kernels do not use it) and the float code paths of every toy step
# (cpu_pins.py; 00 sets them itself too): one world and one demo table on every x86-64 CPU with AVX2, at any core
# count (docs/toy_world.md#determinism). `=`, not `?=`: a shell's own OMP_NUM_THREADS would change the table
export OMP_NUM_THREADS = 2
$(foreach pin,$(shell $(PY) cpu_pins.py),$(eval export $(pin)))
export TOKENIZERS_PARALLELISM ?= false

# make demo's evaluations of one model ($(1): base, sft or bpo). The toy's vocabulary has no words for POPE's
# "Answer the question using a single word or phrase." (no suffix); the table shows POPE's adversarial split (the
# prior's error), so the demo runs that one (make study runs all three)
demo_model = --model $(TOY)/model $(if $(filter base,$(1)),,--adapter $(RUN)/$(1)/adapter)
demo_evals = \
  --command "04_eval_mmvet.py $(demo_model) --mmvet_json $(TOY)/mmvet.json --image_dir $(TOY)/images \
    --out_dir $(RUN)/eval/$(1)/mmvet --judge exact --max_new_tokens 32 --batch_size 32" \
  --command "05_eval_halbench.py $(demo_model) --questions $(TOY)/halbench.jsonl --image_dir $(TOY)/images \
    --objects $(TOY)/halbench_objects.json --synonyms $(TOY)/synonyms.txt --out_dir $(RUN)/eval/$(1)/halbench \
    --max_new_tokens 96 --num_beams 1 --batch_size 32" \
  --command "06_eval_llavabench.py $(demo_model) --questions $(TOY)/llavabench/questions.jsonl \
    --context $(TOY)/llavabench/context.jsonl --references $(TOY)/llavabench/answers_gpt4.jsonl \
    --rule $(TOY)/llavabench/rule.json --image_dir $(TOY)/llavabench/images --out_dir $(RUN)/eval/$(1)/llavabench \
    --judge overlap --max_new_tokens 96 --batch_size 32" \
  --command "07_eval_pope.py $(demo_model) --questions $(TOY)/pope/coco_pope_adversarial.json --image_dir $(TOY)/images \
    --out_dir $(RUN)/eval/$(1)/pope --prompt_suffix '' --max_new_tokens 20 --batch_size 64"

.PHONY: demo test test-fast study install clean
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# No GPU here: take the small CPU wheel first, so requirements.txt does not pull the CUDA build.
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/pip install -q "torch==2.13.0" || \
	  $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	# tests: sentencepiece + protobuf read LLaMA-2's tokenizer.model; pyarrow reads RLAIF-V's parquet, tensorboard is
	# 03 --report_to's (both optional for a run)
	$(BIN)/pip install -q -r requirements.txt pytest sentencepiece protobuf pyarrow tensorboard
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not toy and not slow"

# the toy world is built once (and again when 00_make_toy.py or the pins change); a seed always builds the same world
$(TOY)/prior_check.json: 00_make_toy.py cpu_pins.py | $(VENV)/.installed
	$(BIN)/python 00_make_toy.py --out $(TOY) --arch $(ARCH) $(TOY_BUILD)

demo: install $(TOY)/prior_check.json
	# negatives of both kinds: the model answering from weakened images, and rule-based error injection
	$(BIN)/python 01_build_pairs.py --model $(TOY)/model --data toy=$(TOY)/train.json --image_root $(TOY)/images \
	  --out $(RUN)/pairs_weakened.jsonl --noise_step $(TOY_NOISE) --samples_per_source $(TOY_PAIRS) --max_new_tokens 72 --batch_size 32
	$(BIN)/python 02_inject_errors.py --backend rules --vocab $(TOY)/world.json --data toy=$(TOY)/train.json \
	  --out $(RUN)/pairs_injected.jsonl --samples_per_source $(TOY_PAIRS)
	$(BIN)/python 03_train_bpo.py --model $(TOY)/model --data $(RUN)/pairs_weakened.jsonl --data $(RUN)/pairs_injected.jsonl \
	  --image_root $(TOY)/images --output_dir $(RUN)/bpo --lr $(TOY_DPO_LR) $(TOY_TRAIN)
	# the paper's Table 3 baseline: SFT on the same chosen answers
	$(BIN)/python 03_train_bpo.py --model $(TOY)/model --data $(RUN)/pairs_weakened.jsonl --data $(RUN)/pairs_injected.jsonl \
	  --image_root $(TOY)/images --output_dir $(RUN)/sft --loss sft --lr $(TOY_SFT_LR) $(TOY_TRAIN)
	# the adapters were just retrained (--overwrite), so their old answers go (a changed TOY_*_LR would not match them)
	rm -rf $(RUN)/eval/sft $(RUN)/eval/bpo
	# 04-07 on each model, in one process (experiments/evaluate.py: the imports are paid once, not twelve times)
	$(BIN)/python experiments/evaluate.py $(foreach m,base sft bpo,$(call demo_evals,$(m)))
	@echo "toy world: $(TOY)/  pairs: $(RUN)/pairs_*.jsonl  runs: $(RUN)/bpo/ $(RUN)/sft/ (metrics.jsonl, curves.png, adapter/)  evals: $(RUN)/eval/"
	$(BIN)/python experiments/demo_table.py --prior_check $(TOY)/prior_check.json base=$(RUN)/eval/base sft=$(RUN)/eval/sft bpo=$(RUN)/eval/bpo

# the paper's claims in miniature: 2 worlds, 3 seeds, dev-selected settings, verdicts by experiments/rules.py;
# resumable (finished steps are skipped)
study: install
	$(BIN)/python experiments/study.py --toy $(TOY) --control_toy $(TOY)_control --runs runs/study --results results

clean:
	rm -rf toy toy_* runs
