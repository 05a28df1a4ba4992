"""The TRL side of bench/train_vs_trl.py and bench/gpu_check.py: TRL's DPOTrainer on the same model, pairs,
pair order, prompt text, images, LoRA config, beta, batch size and lr as 03_train_bpo.py.

As a script (bench/train_vs_trl.py runs it in a process of its own) it writes a JSON with per-step seconds,
the step-1 logps/chosen and logps/rejected TRL logged, (CUDA) peak memory, and whether the tokens TRL's
collator builds for step 1 are 03's tokens less BOS. bench/gpu_check.py imports it and trains a model it
built in memory. Not meant to be run by hand; see bench/train_vs_trl.py for what is fair about the settings."""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import common  # noqa: E402  (the prompt text, the square padding and, for the token check only, 03's tokens)
import data  # noqa: E402  (the image loader only: TRL does all the rest)
import dist_io  # noqa: E402  (the pairs reader)


def rows_in_order(pairs, order, image_root, processor, fmt=common.LLAVA_15):
    """TRL's standard (non-conversational) format with the prompt already written, in 03's pair order: the
    same text 03 trains on (common.chat_prompt in the model's input format fmt: LLaVA-1.5's Vicuna-v1, or
    Qwen2.5-VL's template) and the same pixels (each image padded to a square where fmt pads, as 03 does).
    TRL's collator tokenises the prompt and each response separately with add_special_tokens=False (no BOS)
    and adds no EOS for image data: EOS is appended here, so both sides score the response and EOS."""
    eos = processor.tokenizer.eos_token
    rows = []
    for i in order:
        pair = pairs[i]
        image = data.load_image(image_root, pair["image"])
        image = common.pad_square(image, processor) if fmt.pad_square else image
        prompt = common.chat_prompt(processor, pair["prompt"], fmt)
        sep = "" if prompt[-1:].isspace() else " "  # as common.response_ids joins them
        rows.append({"images": [image], "prompt": prompt,
                     "chosen": sep + pair["chosen"] + eos, "rejected": sep + pair["rejected"] + eos})
    return rows


class StepClock(TrainerCallback):
    """Seconds per optimizer step, from the end of the previous step's logging (or the start of training)
    to this step's end: data collation, forward, backward and optimizer step, as 03 times its steps."""

    def __init__(self):
        self.seconds, self.step1 = [], {}

    def on_train_begin(self, *_, **__):
        self.t0 = time.perf_counter()

    def on_step_end(self, *_, **__):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.t0)

    def on_log(self, _args, state, _control, logs=None, **__):
        if state.global_step == 1 and "logps/chosen" in (logs or {}):
            self.step1 = {k: logs[k] for k in ("logps/chosen", "logps/rejected", "loss")}
        self.t0 = time.perf_counter()


def dpo_config(output_dir, steps, batch_size, lr, beta, seed, checkpointing=False):
    """TRL's settings matched to 03's (and TRL's own defaults that would change the work turned off)."""
    from trl import DPOConfig
    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, learning_rate=lr, beta=beta, loss_type=["sigmoid"],
        lr_scheduler_type="cosine", warmup_steps=0,  # 03 is run with --warmup_ratio 0
        weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch",  # 03 uses torch.optim.AdamW
        # TRL's defaults differ from HF Trainer's and from 03's: it turns gradient checkpointing and bf16 on
        # (transformers 5 calls the former activation_checkpointing; TRL's gradient_checkpointing is its alias);
        # when on, non-reentrant as 03's --gradient_checkpointing
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=cuda, fp16=False,
        model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},  # 03: bf16 weights on CUDA, fp32 on CPU
        max_length=None,  # no truncation (TRL's default cuts at 1024); 03 cuts nothing here (its --max_length 2048)
        train_sampling_strategy="sequential",  # the dataset is already in 03's order
        dataloader_num_workers=0, dataloader_pin_memory=False,  # as 03: batches built in the main process
        logging_steps=1, save_strategy="no", report_to="none", seed=seed, disable_tqdm=True)
    assert bool(config.gradient_checkpointing) == checkpointing
    return config


def trainer_for(model, processor, rows, config, lora_r, lora_alpha, lora_targets, lora_dropout=0.0):
    """(DPOTrainer, StepClock): `model` a path or a model in memory (TRL wraps it with LoRA itself)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer
    if not isinstance(model, str):
        config.model_init_kwargs = None  # only read for a path (TRL warns otherwise)
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_targets)
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=lora, callbacks=[clock])
    return trainer, clock


def token_check(trainer, processor, pairs, order, image_root, batch_size, fmt=common.LLAVA_15):
    """Step 1's sequences as TRL's collator builds them against 03's (common.build_sequences, the pairs'
    images padded as 03 pads them): {"sequences": n, "equal_less_bos": n equal to 03's without its BOS,
    "first_difference": a description or None}."""
    batch = trainer.data_collator([trainer.train_dataset[k] for k in range(batch_size)])
    bos = processor.tokenizer.bos_token_id
    n = equal = 0
    first = None
    for k, i in enumerate(order[:batch_size]):
        pair = pairs[i]
        _, seqs, _ = common.build_sequences(processor, data.load_image(image_root, pair["image"]), pair["prompt"],
                                            [pair["chosen"], pair["rejected"]], 10**6, fmt)
        for j, (ours, _labels) in enumerate(seqs):  # TRL's rows: [chosen x batch, rejected x batch]
            row = j * batch_size + k
            theirs = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            want = ours[1:] if ours[0] == bos else ours
            n += 1
            if theirs == want:
                equal += 1
            elif first is None:
                at = next((t for t, (a, b) in enumerate(zip(theirs, want)) if a != b), min(len(theirs), len(want)))
                first = (f"pair {pair['id']} {('chosen', 'rejected')[j]}: {len(theirs)} vs {len(want)} tokens, "
                         f"first difference at {at}: TRL {theirs[at:at + 5]} ours {want[at:at + 5]}")
    return {"sequences": n, "equal_less_bos": equal, "first_difference": first}


def main():
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
    from transformers import AutoProcessor

    # ---- the pairs in 03's order: 03 takes epoch e's steps from randperm(seed + e); one epoch suffices
    pairs = dist_io.read_jsonl(args.pairs)
    n = args.steps * args.batch_size
    assert len(pairs) >= n, f"{len(pairs)} pairs, fewer than {args.steps} steps of {args.batch_size}"
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()[:n]
    processor = AutoProcessor.from_pretrained(args.model)
    rows = rows_in_order(pairs, order, args.image_root, processor)
    config = dpo_config(args.output_dir, args.steps, args.batch_size, args.lr, args.beta, args.seed)
    trainer, clock = trainer_for(args.model, processor, rows, config, args.lora_r, args.lora_alpha, args.lora_targets)
    tokens = token_check(trainer, processor, pairs, order, args.image_root, args.batch_size)
    trainer.train()
    assert clock.step1, "TRL logged no logps/chosen at step 1"
    result = {"seconds_per_step": clock.seconds, **clock.step1, "tokens": tokens}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
