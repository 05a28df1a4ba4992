"""The TRL side of bench/train_vs_trl.py, run by it in a process of its own: TRL's DPOTrainer on the
same model, pairs, pair order, LoRA config, beta, batch size and lr as 03_train_bpo.py. Writes a JSON
with per-step seconds, the step-1 logps/chosen and logps/rejected TRL logged, and (CUDA) peak memory.
Not meant to be run by hand; see bench/train_vs_trl.py for what is fair about the settings."""
import argparse
import json
import os
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoProcessor, TrainerCallback
from trl import DPOConfig, DPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import jobs  # noqa: E402  (the pairs reader and the image loader only: TRL does all the rest)
import common  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--model", required=True)
p.add_argument("--pairs", required=True)
p.add_argument("--image_root", required=True)
p.add_argument("--output_dir", required=True)
p.add_argument("--result", required=True, help="JSON written at the end")
p.add_argument("--steps", type=int, required=True)
p.add_argument("--batch_size", type=int, required=True)
p.add_argument("--lr", type=float, required=True)
p.add_argument("--beta", type=float, required=True)
p.add_argument("--lora_r", type=int, required=True)
p.add_argument("--lora_alpha", type=int, required=True)
p.add_argument("--lora_targets", required=True, help="03's LORA_TARGETS regex")
p.add_argument("--seed", type=int, required=True)
args = p.parse_args()
cuda = torch.cuda.is_available()

# ---- the pairs in 03's order: 03 takes epoch e's steps from randperm(seed + e); one epoch suffices
pairs = jobs.read_jsonl(args.pairs)
n = args.steps * args.batch_size
assert len(pairs) >= n, f"{len(pairs)} pairs, fewer than {args.steps} steps of {args.batch_size}"
order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()[:n]
processor = AutoProcessor.from_pretrained(args.model)
eos = processor.tokenizer.eos_token
# TRL's standard (non-conversational) format with the prompt already templated: the same chat text as 03,
# so that TRL scores the same tokens (it drops BOS: its collator tokenizes with add_special_tokens=False).
# TRL appends EOS to text-only responses but not to image data; appended here so both sides score it.
rows = [{"images": [jobs.load_image(args.image_root, pairs[i]["image"])],
         "prompt": common.chat_prompt(processor, pairs[i]["prompt"]),
         "chosen": " " + pairs[i]["chosen"] + eos, "rejected": " " + pairs[i]["rejected"] + eos} for i in order]
dataset = Dataset.from_list(rows)


class StepClock(TrainerCallback):
    """Seconds per optimizer step, from the end of the previous step's logging (or the start of training)
    to this step's end: data collation, forward, backward and optimizer step, as 03 times its steps."""

    def __init__(self):
        self.seconds, self.step1 = [], {}

    def on_train_begin(self, *_, **__):
        self.t0 = time.perf_counter()

    def on_step_end(self, *_, **__):
        self.seconds.append(time.perf_counter() - self.t0)

    def on_log(self, _args, state, _control, logs=None, **__):
        if state.global_step == 1 and "logps/chosen" in (logs or {}):
            self.step1 = {k: logs[k] for k in ("logps/chosen", "logps/rejected", "loss")}
        self.t0 = time.perf_counter()


config = DPOConfig(
    output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
    gradient_accumulation_steps=1, learning_rate=args.lr, beta=args.beta, loss_type=["sigmoid"],
    lr_scheduler_type="cosine", warmup_steps=0,  # 03 is run with --warmup_ratio 0
    weight_decay=0.0, max_grad_norm=1.0,
    optim="adamw_torch",  # 03 uses torch.optim.AdamW
    # TRL's defaults differ from HF Trainer's and from 03's: it turns gradient checkpointing and bf16 on
    # (transformers 5 calls the former activation_checkpointing; TRL's gradient_checkpointing is its alias)
    activation_checkpointing=False, bf16=cuda, fp16=False,
    model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},  # 03: bf16 weights on CUDA, fp32 on CPU
    max_length=None,  # no truncation (TRL's default cuts at 1024); 03 cuts nothing here (its --max_length 2048)
    train_sampling_strategy="sequential",  # the dataset is already in 03's order
    dataloader_num_workers=0, dataloader_pin_memory=False,  # as 03: batches built in the main process
    logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True)
assert not config.gradient_checkpointing
lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=args.lora_targets)
clock = StepClock()
trainer = DPOTrainer(model=args.model, args=config, train_dataset=dataset, processing_class=processor,
                     peft_config=lora, callbacks=[clock])
trainer.train()
assert clock.step1, "TRL logged no logps/chosen at step 1"

result = {"seconds_per_step": clock.seconds, **clock.step1}
if cuda:
    result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
with open(args.result, "w") as f:
    json.dump(result, f)
