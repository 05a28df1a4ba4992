"""Step 8: export. The adapter merged into the base model and written as one full checkpoint (config,
safetensors weights, processor with its chat template, generation config) that
AutoModelForImageTextToText / AutoProcessor load with no peft installed: what evaluation toolkits
such as lmms-eval take. A QLoRA adapter (03 --load_in_4bit) is merged into the base loaded in bf16
(a 4-bit base cannot hold merged weights); otherwise the base keeps the dtype it is stored in.
    python 08_export.py --model llava-hf/llava-1.5-7b-hf --adapter runs/bpo-7b/adapter --out runs/bpo-7b/merged"""
import argparse
import os
import sys

import torch

import common
import dist_io
import loading
import runs
from families import family_of

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dist_io.HelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="03's OUTPUT_DIR/adapter (peft)")
    p.add_argument("--out", required=True, help="the merged checkpoint's folder (refused if it holds files)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="the merged weights' dtype (auto: the base's stored dtype; bfloat16 for a QLoRA adapter)")
    return p.parse_args(argv)


def trained_in_4bit(adapter):
    """Whether 03 trained this adapter on a 4-bit base: its run's last checkpoint records the flags."""
    done = runs.checkpoints(os.path.dirname(os.path.abspath(adapter)))
    if not done:
        return False
    state = torch.load(os.path.join(done[-1], "state.pt"), weights_only=True)
    return bool(state.get("args", {}).get("load_in_4bit"))


def main(argv=None):
    args = parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        sys.exit(f"error: --adapter {args.adapter}: no adapter_config.json (03 writes OUTPUT_DIR/adapter)")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"error: --out {args.out} is not empty")
    qlora = trained_in_4bit(args.adapter)
    dtype = torch.bfloat16 if qlora and args.dtype == "auto" else DTYPES[args.dtype]
    base = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    with loading.quiet_peft():
        merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out, safe_serialization=True)  # config, safetensors, generation config
    # tokenizer, image processor, chat template (the Qwen families' without torchvision: no video processor)
    family_of(args.model).save_processor(loading.load_processor(args.model, padding_side=None), args.out)
    print(f"wrote {args.out}: {args.model} + {args.adapter} merged ({str(merged.dtype).removeprefix('torch.')}"
          f"{', from a QLoRA adapter' if qlora else ''}); load it with AutoModelForImageTextToText.from_pretrained")


if __name__ == "__main__":
    main()
