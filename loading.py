"""Loading a model and its processor, of any supported family (families/): bf16 on CUDA, fp32 elsewhere; QLoRA's NF4
language model; a peft adapter merged in for inference; LoRA added for training; the language model sharded with FSDP2
(03 --fsdp)."""
import contextlib
import warnings

import torch

from families import family_of


def load_model(name, adapter=None, device="cpu", load_in_4bit=False, on_host=False):
    """(model, processor) of a checkpoint dir or hub id; optionally with a peft adapter merged in for inference.
    on_host: the weights left in host memory in the device's dtype (03 --fsdp: fully_shard_language_model moves each
    rank's shards to the device, so no GPU ever holds the whole model; a checkpoint stored in that dtype stays
    memory-mapped, one copy in the page cache for all of a node's processes)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    family = family_of(name)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if load_in_4bit:  # QLoRA: the language model in NF4, the rest as the family keeps it
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(family.skip_4bit))
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    if not (load_in_4bit or on_host):
        model.to(device)
    processor = load_processor(name)
    if adapter:
        from peft import PeftModel
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter)
        if not load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, processor


def load_processor(name, padding_side="left"):
    """The tokenizer + image processor of a checkpoint, padding on the left (for generation; None: as stored)."""
    processor = family_of(name).load_processor(name)
    if padding_side:
        processor.tokenizer.padding_side = padding_side
    return processor



def with_lora(model, config):
    """The model with fresh LoRA adapters (peft's get_peft_model) as config says; they start as a no-op."""
    from peft import get_peft_model
    with quiet_peft():
        return get_peft_model(model, config)


def vision_side(model):
    """The parameters of the vision encoder and projector(s) (LLaVA-NeXT's image_newline too), as the family names
    them: what families.image_features runs outside the model's forward."""
    family = family_of(model)
    return {*family.pixel_module(model)[0].parameters(), *family.projector_parameters(model)}


def fully_shard_language_model(model):
    """FSDP2 over the job's process group (03 --fsdp), in place: each decoder layer of the language model a unit (its
    LoRA with it), the rest of the language model (embeddings, final norm, LM head) the root's. The vision side stays
    out, whole on every rank: families.image_features runs it outside the root's forward, where FSDP would not gather
    it (and it is small beside the language model). Frozen bf16 and trainable fp32 LoRA share a unit: FSDP2 gathers
    mixed dtypes, and reduces the (fp32) LoRA gradients in fp32. `model` is a peft model or a plain one, on the device
    or in host memory (load_model's on_host: FSDP moves a unit's weights to the device as it shards them, one unit at
    a time, and the vision side is moved here). Returns the line 03 prints: what rank 0 holds."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = vision_side(base)
    for layer in base.get_decoder().layers:
        fully_shard(layer)
    fully_shard(base, ignored_params=vision)  # FSDP moved what it shards (and every buffer) to its device
    device = next(p.device for p in base.parameters() if isinstance(p, DTensor))
    for p in vision:
        p.data = p.data.to(device)
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in base.parameters())
    return (f"fsdp: the language model in {len(base.get_decoder().layers) + 1} units over "
            f"{torch.distributed.get_world_size()} process(es); rank 0 holds {held:,} of the model's "
            f"{sum(p.numel() for p in base.parameters()):,} parameters (the vision side's "
            f"{sum(p.numel() for p in vision):,} whole)")


@contextlib.contextmanager
def quiet_peft():
    # peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: a FutureWarning
    # on every run that no user can act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
