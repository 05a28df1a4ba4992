"""08_export.py: the adapter merged into the base loads as a plain checkpoint, with no peft, and gives the logits
of base + adapter."""
import json
import os
import subprocess
import sys

import torch
from peft import LoraConfig, PeftModel

import common
import data
import loading
from conftest import ROOT, run_here

# loads the exported folder with peft made unimportable, and prints the logits of one prompt and image
LOAD_WITHOUT_PEFT = """import sys, json, torch
sys.modules["peft"] = None  # any import of peft now fails
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
out, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(out)
processor = AutoProcessor.from_pretrained(out)
enc = processor(text=[sys.argv[3]], images=[Image.open(image).convert("RGB")], return_tensors="pt")
with torch.no_grad():
    print(json.dumps(model(**enc).logits[0, -1].tolist()))
"""


def test_export_merges_and_loads_without_peft(toy, tmp_path):
    model, processor = loading.load_model(str(toy / "model"))
    torch.manual_seed(0)
    lora = loading.with_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=common.LORA_TARGETS))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # an adapter that changes the outputs
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    proc = run_here("08_export.py", "--model", toy / "model", "--adapter", tmp_path / "adapter", "--out", out,
                    check=True)
    assert "merged" in proc.stdout
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json"} <= files
    assert "adapter_config.json" not in files and "peft" not in (out / "config.json").read_text()
    assert (out / "chat_template.jinja").read_text() == (toy / "model" / "chat_template.jinja").read_text()

    rec = json.load(open(toy / "train.json"))[0]
    prompt = common.chat_prompt(processor, "Describe the image in detail.")
    image = data.check_image(toy / "images", rec["image"])
    got = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), image, prompt], capture_output=True,
                         text=True, cwd=ROOT)
    assert got.returncode == 0, got.stderr[-2000:]
    base, _ = loading.load_model(str(toy / "model"))
    with loading.quiet_peft():
        unmerged = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    enc = processor(text=[prompt], images=[data.load_image(toy / "images", rec["image"])], return_tensors="pt")
    with torch.no_grad():
        want = unmerged(**enc).logits[0, -1]
    merged_logits = torch.tensor(json.loads(got.stdout.strip().splitlines()[-1]))
    assert torch.allclose(merged_logits, want, atol=1e-4)
    with unmerged.disable_adapter(), torch.no_grad():
        assert (unmerged(**enc).logits[0, -1] - want).abs().max() > 1e-3  # the adapter does change them
    assert run_here("08_export.py", "--model", toy / "model", "--adapter", tmp_path / "adapter", "--out",
                    out).returncode != 0  # an export never writes into a folder that holds files


def test_qlora_adapter_is_merged_in_bf16(toy, tmp_path):
    """An adapter 03 trained with --load_in_4bit (its run's checkpoint says so) is merged into the base in bf16."""
    model, _ = loading.load_model(str(toy / "model"))
    lora = loading.with_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=common.LORA_TARGETS))
    run = tmp_path / "run"
    lora.save_pretrained(run / "adapter")
    (run / "checkpoint-1").mkdir(parents=True)
    torch.save({"step": 1, "args": {"load_in_4bit": True}}, run / "checkpoint-1" / "state.pt")
    proc = run_here("08_export.py", "--model", toy / "model", "--adapter", run / "adapter", "--out", tmp_path / "m",
                    check=True)
    assert "bfloat16, from a QLoRA adapter" in proc.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
