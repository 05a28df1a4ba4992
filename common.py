"""The method of BPO, in small functions read top to bottom: loading a LLaVA-style model (or Qwen2.5-VL,
docs/other_models.md) and its input format, the forward-diffusion noise that weakens an image, generation, the token convention
with packed response log-probs, and the whole preference objective (DPO, IPO, SFT and the added
terms). The job plumbing is beside it: dist_io.py (process groups, files), data.py (records),
runs.py (03's run directory), remote.py (endpoints), scoring.py (every scoring rule)."""
import argparse
import collections
import contextlib
import hashlib
import math
import warnings

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position whose token is not scored
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"  # the paper's model, every script's default
# LoRA on every linear layer of the language model; nothing in the vision tower or the projector, so the model
# with the adapter disabled is exactly the reference
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
QWEN_VL = "qwen2_5_vl"  # the second family (docs/other_models.md); every other model_type is read as LLaVA-style

# ----------------------------------------------------------------------------- model and input format

def load_model(name, adapter=None, device="cpu", load_in_4bit=False):
    """(model, processor) for a LLaVA-style checkpoint dir or hub id; optionally with a peft
    adapter merged in for inference. bf16 on CUDA, fp32 elsewhere."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if load_in_4bit:  # QLoRA: the language model in NF4, vision tower and projector kept as is
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            # names from the model's root: transformers matches a bare "vision_tower" only as a whole module name, and
            # would quantize the Linear layers inside it
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"])
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    if not load_in_4bit:
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


def with_lora(model, config):
    """The model with fresh LoRA adapters (peft's get_peft_model) as config says; they start as a no-op."""
    from peft import get_peft_model
    with quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def quiet_peft():
    # peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: a FutureWarning
    # on every run that no user can act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_processor(name, padding_side="left"):
    """The tokenizer + image processor of a checkpoint, padding on the left (for generation; None: as stored).
    Qwen2.5-VL's without torchvision: qwen_processor_without_video."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available
    if model_family(name) == QWEN_VL and not is_torchvision_available():
        processor = qwen_processor_without_video(name)
    else:
        processor = AutoProcessor.from_pretrained(name)
    if padding_side:
        processor.tokenizer.padding_side = padding_side
    return processor


def save_processor(processor, folder):
    """The processor's files as the family's checkpoints hold them; a Qwen2.5-VL processor without its video half
    (qwen_processor_without_video) as tokenizer, image processor and chat template, which AutoProcessor reads back
    where torchvision is installed (its video processor then from defaults) and load_processor anywhere."""
    import json
    import os
    if getattr(processor, "video_processor", True) is not None:
        return processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(processor.chat_template)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        json.dump({"processor_class": type(processor).__name__}, f)


def model_family(name):
    """QWEN_VL or "llava", from the checkpoint's config.json: a local folder's, else the one in the hub cache;
    a hub id not downloaded yet by its name (nothing is fetched: the flags' defaults are settled before any
    model loads, and scripts that stop on bad input never load one); "llava" when there is no model."""
    import json
    import os
    if not name:
        return "llava"
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
    if isinstance(path, str) and os.path.isfile(path):
        with open(path) as f:
            return QWEN_VL if json.load(f).get("model_type") == QWEN_VL else "llava"
    return QWEN_VL if "qwen2.5-vl" in name.lower() else "llava"


def qwen_processor_without_video(name):
    """Qwen2.5-VL's processor for images only, where torchvision is missing: its video processor needs
    torchvision and the processor's constructor insists on one (so does AutoProcessor), so the processor is
    assembled from the checkpoint's tokenizer, chat template and the PIL image processor (the same resize
    and normalisation as the default one)."""
    import os
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(name)
    template = os.path.join(name, "chat_template.jinja")
    return qwen_processor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(name),
                          open(template).read() if os.path.isfile(template) else tokenizer.chat_template)


def qwen_processor(tokenizer, image_processor, chat_template):
    """A Qwen2_5_VLProcessor without a video processor (its constructor's check skipped)."""
    from transformers import Qwen2_5_VLProcessor
    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    processor.tokenizer, processor.image_processor, processor.video_processor = tokenizer, image_processor, None
    processor.chat_template = chat_template
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor


def qwen_mrope_section(head_dim):
    """Qwen2.5-VL's split of a head's rotary frequencies over (temporal, height, width): [16, 24, 24] at its
    head_dim 128, in proportion at another (the toy's, a benchmark's)."""
    return [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]


def is_qwen(processor_or_model):
    """Whether a processor or model is of the Qwen2.5-VL family."""
    config = getattr(processor_or_model, "config", None)
    if config is not None:
        return config.model_type == QWEN_VL
    return hasattr(processor_or_model.image_processor, "merge_size")


def image_token_count(processor, image=None, fmt=None):
    """How many tokens the processor expands one image into: 576 for LLaVA-1.5's 336 px CLIP (any image); for
    Qwen2.5-VL's dynamic resolution, of this image in this input format: its patches / merge_size^2."""
    from PIL import Image
    if is_qwen(processor):
        ip = processor.image_processor
        width, height = (pad_square(image, processor) if fmt.pad_square else image).size
        return ip.get_number_of_image_patches(height, width, {}) // ip.merge_size ** 2
    size = processor.image_processor.crop_size
    enc = processor(text=[processor.image_token], images=[Image.new("RGB", (size["width"], size["height"]))])
    return len(enc["input_ids"][0]) - len(processor.tokenizer(processor.image_token).input_ids) + 1


# LLaVA-1.5's conversation (LLaVA's conv_vicuna_v1): how it was trained and how it is evaluated
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
InputFormat = collections.namedtuple("InputFormat", "chat_format pad_square")
LLAVA_15 = InputFormat("vicuna_v1", True)


def add_format_args(parser):
    """--chat_format and --pad_square, on every script that builds a prompt."""
    parser.add_argument("--chat_format", choices=["vicuna_v1", "template"], default=None,
                        help="vicuna_v1: LLaVA-1.5's conversation (its system line, then ' USER: <image>\\n{question} "
                             "ASSISTANT:'), as it was trained and evaluated; template: the processor's own chat "
                             "template (default: vicuna_v1, or template for Qwen2.5-VL)")
    parser.add_argument("--pad_square", action=argparse.BooleanOptionalAction, default=None,
                        help="pad each image to a square with the image processor's mean colour, centred, before the "
                             "processor (LLaVA-1.5's image_aspect_ratio: pad); --no-pad_square: the processor alone "
                             "(CLIP's resize and centre crop; Qwen2.5-VL's dynamic resolution). Default: on, off for "
                             "Qwen2.5-VL")


QWEN_FORMAT = InputFormat("template", False)  # Qwen2.5-VL's own chat template at its own (dynamic) resolution


def family_format(family):
    """The input format a family was trained with: LLAVA_15, or QWEN_FORMAT."""
    return QWEN_FORMAT if family == QWEN_VL else LLAVA_15


def input_format(args):
    """The input format the flags ask for; where one is not given, the model family's (LLaVA-1.5's Vicuna-v1 and
    square padding; Qwen2.5-VL's chat template at its own resolution)."""
    default = family_format(model_family(getattr(args, "model", None)) if None in (args.chat_format, args.pad_square)
                            else "llava")
    return InputFormat(args.chat_format or default.chat_format,
                       default.pad_square if args.pad_square is None else args.pad_square)


def chat_prompt(processor, question, fmt=LLAVA_15, image=True, history=()):
    """The text of a conversation ending where the answer to `question` starts: the earlier turns
    `history` ([question, answer] pairs, the image in the first) and then the question. Questions and
    answers are stripped of surrounding white space, as LLaVA's preprocessing does. Vicuna-v1 joins the
    turns as LLaVA's conv_vicuna_v1: `SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:`."""
    turns = [(q.strip(), a.strip()) for q, a in history] + [(question.strip(), None)]
    if fmt.chat_format == "vicuna_v1":
        text = VICUNA_SYSTEM + " "
        for k, (q, a) in enumerate(turns):
            text += "USER: " + (f"{processor.image_token}\n" if image and k == 0 else "") + q + " ASSISTANT:"
            text += f" {a}{processor.tokenizer.eos_token}" if a is not None else ""
        return text
    messages = []
    for k, (q, a) in enumerate(turns):
        messages.append({"role": "user", "content": ([{"type": "image"}] if image and k == 0 else [])
                         + [{"type": "text", "text": q}]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def pad_square(image, processor):
    """LLaVA-1.5's expand2square: the image centred on a square of the processor's mean colour, so
    that the resize keeps all of it (CLIP's centre crop would cut the edges, and objects there)."""
    from PIL import Image
    w, h = image.size
    if w == h:
        return image
    colour = tuple(int(255 * m) for m in processor.image_processor.image_mean)
    square = Image.new(image.mode, (max(w, h), max(w, h)), colour)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def encode(processor, texts, images, fmt):
    """Processor inputs for prompts with one image each, padded to squares where the format says so."""
    if fmt.pad_square:
        images = [pad_square(im, processor) for im in images]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def question_text(text):
    """A question as the chat template takes it: every literal `<image>` removed, since the template
    puts the image in exactly once (a second placeholder would take another image's features)."""
    return text.replace("<image>", "").strip()


# ----------------------------------------------------------------------------- image weakening


def noise_schedule(num_steps=1000):
    """abar_t of the forward diffusion used by VCD and BPO: betas = sigmoid(linspace(-6, 6))
    scaled into [1e-5, 5e-3]."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffuse(x, step, scale, generator=None):
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) * scale * eps. Step 0 returns x untouched (no
    weakening), steps 1..1000 index abar[step - 1]."""
    if step <= 0:
        return x
    abar = noise_schedule()[min(step, 1000) - 1].item()
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device, x.dtype)
    return abar ** 0.5 * x + (1 - abar) ** 0.5 * scale * eps


def _feature_scale(x, sizes=None):
    # per image std, so that a step means the same signal-to-noise ratio for any encoder: unit-variance noise
    # on features of std ~4 (the toy's CLIP stand-in) would barely touch them (docs/toy_world.md). LLaVA's features
    # come one image a row; Qwen2.5-VL's as one [patches, dim] block, `sizes` patches an image
    if sizes is None:
        return x.float().flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.cat([part.float().std().expand(len(part), 1) for part in x.split(sizes)]).to(x.dtype)


@contextlib.contextmanager
def weaken_images(model, noise_step, noise_on="features", generator=None):
    """Within this context every image the model sees is weakened by `noise_step` steps of
    forward diffusion: on the features the vision encoder hands to the projector (as in the paper: LLaVA's
    CLIP features, Qwen2.5-VL's before its patch merger) or on the normalised pixels (as in the authors'
    released script, unit-variance noise as in VCD)."""
    if noise_step <= 0:
        yield
        return
    if noise_on not in ("features", "pixels"):
        raise ValueError(f"noise_on must be features or pixels, got {noise_on!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner, handles = base.model, []
    if is_qwen(base):
        grids = []  # the images' patch counts, read off each vision forward for the per-image scale
        handles.append(inner.visual.register_forward_pre_hook(
            lambda _mod, args, kwargs: grids.append(kwargs["grid_thw"].prod(-1).tolist()), with_kwargs=True))
        module = inner.visual.merger if noise_on == "features" else inner.visual
        scale_of = (lambda x: _feature_scale(x, grids[-1])) if noise_on == "features" else (lambda x: 1.0)
    elif noise_on == "features":
        module, scale_of = inner.multi_modal_projector, _feature_scale
    else:
        module, scale_of = inner.vision_tower, (lambda x: 1.0)

    def hook(_mod, args):
        x = args[0]
        return (diffuse(x, noise_step, scale_of(x), generator),) + tuple(args[1:])

    handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pair_weakening(key, meta, noise_step=-1, noise_on=None):
    """(noise step, where, seed) of a pair's weakened image (the conditional term's): 01's settings from
    the pair's meta unless given (noise_step -1, noise_on None), else step 500 on the features; the seed
    from the pair's key and the step, so that the policy, the reference and a resumed run all see the
    same weakened image."""
    meta = meta if isinstance(meta, dict) else {}
    step = noise_step if noise_step >= 0 else int(meta.get("noise_step", 500))
    where = noise_on or meta.get("noise_on", "features")
    return step, where, int(hashlib.sha256(f"{key}\t{step}\t{where}".encode()).hexdigest()[:15], 16)


# ----------------------------------------------------------------------------- generation


CACHE_BLOCK = 256  # a static KV cache is sized in whole blocks of this many tokens


def decode_compile_config(device):
    """How transformers compiles the decode step of a static-cache generate, on CUDA (None elsewhere: it compiles
    nothing there): the batch size and the cache length dynamic from the first call, so a run compiles it once, not
    per prompt length (a count the tests pin); CUDA graphs (its default mode) then record once per cache size, which
    CACHE_BLOCK keeps to a few."""
    from transformers import CompileConfig
    return CompileConfig(dynamic=True) if device.type == "cuda" else None


@torch.no_grad()
def generate(model, processor, images, prompts, fmt=LLAVA_15, max_new_tokens=512, do_sample=False,
             temperature=1.0, top_p=1.0, num_beams=1, keep_unfinished=True, static_cache=True):
    """One batch of answers, left-padded; prompts are plain questions. With keep_unfinished=False an
    answer that reached max_new_tokens without EOS (cut mid-sentence) comes back as None. A static KV cache
    (allocated for prompt + max_new_tokens, rounded up to CACHE_BLOCK; on CUDA transformers then compiles the decode
    step, decode_compile_config): the same tokens as the dynamic cache's (static_cache=False, the bench's
    comparison), faster on CPU too (bench/README.md)."""
    enc = encode(processor, [chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    n_prompt = enc["input_ids"].shape[1]
    cache = dict(cache_implementation="static", compile_config=decode_compile_config(model.device),
                 max_cache_len=-(-(n_prompt + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK) if static_cache else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id,
                         num_beams=num_beams, **cache, **sampling)[:, n_prompt:]
    texts = [s.strip() for s in processor.batch_decode(out, skip_special_tokens=True)]
    if keep_unfinished:
        return texts
    eos = model.generation_config.eos_token_id
    ended = torch.isin(out, torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device)).any(1)
    return [t if e else None for t, e in zip(texts, ended.tolist())]


def contrastive_logits(clean, weak, alpha, beta):
    """The authors' released sampler (VCD's rule), per position: (1 + alpha) clean - alpha weak over the tokens
    whose clean probability is at least beta times the clean maximum (logit >= log beta + max logit), -inf
    elsewhere. It pushes the sample towards what the clean image adds, away from the prior."""
    cutoff = math.log(beta) + clean.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * clean - alpha * weak).masked_fill(clean < cutoff, float("-inf"))


@torch.no_grad()
def generate_contrastive(model, processor, images, prompts, fmt, weakening, alpha, beta, temperature=1.0,
                         top_p=1.0, max_new_tokens=512, keep_unfinished=True):
    """generate's sampling with the authors' released rule: at every step contrastive_logits of the clean
    image's and the weakened image's next-token logits (weakening: (noise step, "features"|"pixels", torch
    generator), applied to the images once), then temperature and top-p, then a sample. Each branch keeps its
    own KV cache; the batch is left-padded as generate's. Returns the texts (None for one cut off by
    max_new_tokens, with keep_unfinished=False)."""
    enc = encode(processor, [chat_prompt(processor, p, fmt) for p in prompts], images, fmt)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    ids, mask = enc["input_ids"], enc["attention_mask"]
    vision = {**vision_inputs(enc), "pixel_values": enc["pixel_values"].to(model.dtype)}
    step, where, generator = weakening
    with weaken_images(model, step, where, generator):
        weak_embeds = image_embeds(model, ids, vision)
    if is_qwen(model):  # the model's own multimodal positions of the left-padded prompts
        positions = model.model.get_rope_index(ids, enc["mm_token_type_ids"], enc["image_grid_thw"],
                                               attention_mask=mask)[0]
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    branches = [model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
                for embeds in (image_embeds(model, ids, vision), weak_embeds)]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=ids.device)
    pad = processor.tokenizer.pad_token_id
    done, out = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device), []
    for _ in range(max_new_tokens):
        scores = contrastive_logits(*(b.logits[:, -1].float() for b in branches), alpha, beta) / temperature
        if top_p < 1.0:  # the smallest set of tokens whose probability reaches top_p
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            outside = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1) >= top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(outside, float("-inf")))
        token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        done |= torch.isin(token, eos)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[..., -1:] + 1
        branches = [model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                          cache=b.cache, use_cache=True) for b in branches]
    tokens = torch.stack(out, dim=1)
    texts = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    return texts if keep_unfinished else [t if d else None for t, d in zip(texts, done.tolist())]


# ----------------------------------------------------------------------------- token convention and log-probs


def response_ids(tokenizer, prompt_text, response):
    """Token ids of the response after the chat prompt, plus EOS: the tokens the model produces at
    inference. Tokenised jointly with the prompt (subword merges as at inference) when the prompt's
    own tokens are a prefix of the joint ones; otherwise the response alone. The answer follows the prompt
    after a space (Vicuna-v1's "ASSISTANT: answer"), or directly where the prompt ends in a line break
    (ChatML's "<|im_start|>assistant\n", Qwen2.5-VL's)."""
    prompt = tokenizer(prompt_text).input_ids
    joint = tokenizer(prompt_text + ("" if prompt_text[-1:].isspace() else " ") + response).input_ids
    if joint[:len(prompt)] == prompt:
        ids = joint[len(prompt):]
    else:  # a merge across the boundary: keep the prompt's tokens as generation sees them
        ids = tokenizer(response, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def build_sequences(processor, image, prompt, responses, max_length, fmt=LLAVA_15, history=()):
    """Encodes one image + prompt and its responses under the token convention (the prompt tokenised
    in one call, as at inference; the response and EOS scored). Returns ({image input: tensor},
    list of (input_ids, labels), n_truncated). Responses longer than max_length allows are
    cut at the end; the image and prompt tokens are never cut. The image inputs: pixel_values, and for
    Qwen2.5-VL image_grid_thw (VISION_INPUTS)."""
    prompt_text = chat_prompt(processor, prompt, fmt, history=history)
    enc = encode(processor, [prompt_text], [image], fmt)
    prompt_ids = enc["input_ids"][0].tolist()
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt with image takes {len(prompt_ids)} tokens, more than --max_length {max_length}")
    seqs, cut = [], 0
    for r in responses:
        ids = response_ids(processor.tokenizer, prompt_text, r)
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        seqs.append((prompt_ids + ids, [IGNORE] * len(prompt_ids) + ids))
    return vision_inputs(enc), seqs, cut


VISION_INPUTS = ("pixel_values", "image_grid_thw")  # the processor's image inputs the model reads


def vision_inputs(inputs):
    """The image inputs among a dict of model inputs."""
    return {k: inputs[k] for k in VISION_INPUTS if k in inputs}


def cat_images(visions):
    """The image inputs of several examples as one batch's."""
    return {k: torch.cat([v[k] for v in visions]) for k in visions[0]}


def mrope_positions(input_ids, image_token_id, grid_thw, merge_size):
    """Qwen2.5-VL's multimodal rotary positions of one unpadded sequence, as rows [temporal, height, width]:
    a text token's position counts up on all three; an image's tokens (one per merge_size x merge_size
    patches, row-major) sit at the image's start plus their (t, h, w) cell, and the text after it continues
    from the start plus the longer side in cells."""
    rows, pos, k, grids = ([], [], []), 0, 0, iter(grid_thw.tolist())
    while k < len(input_ids):
        if input_ids[k] != image_token_id:
            for row in rows:
                row.append(pos)
            pos, k = pos + 1, k + 1
            continue
        t, h, w = next(grids)
        h, w = h // merge_size, w // merge_size
        for cell in range(t * h * w):
            for row, offset in zip(rows, (cell // (h * w), cell // w % h, cell % w)):
                row.append(pos + offset)
        pos, k = pos + max(h, w), k + t * h * w
    return [list(row) for row in rows]


def prompt_positions(processor, prompt_ids, vision):
    """The position rows of a prompt: one row 0..n-1 (LLaVA), or Qwen2.5-VL's three (mrope_positions)."""
    if "image_grid_thw" in vision:
        return mrope_positions(prompt_ids, processor.image_token_id, vision["image_grid_thw"],
                               processor.image_processor.merge_size)
    return [list(range(len(prompt_ids)))]


def pad_batch(seqs, pad_id):
    """Right-pads (input_ids, labels) pairs into tensors (input_ids, attention_mask, labels)."""
    n = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def pack_responses(seqs, prompt_pos=None):
    """One image + prompt and its k responses (build_sequences' output: they share the prompt) as one
    sequence [prompt, response_1, ..., response_k] in which each response sees the prompt and itself
    only, its positions continuing the prompt's as if it were the only response: the shared prefix
    (LLaVA-1.5's 576 image tokens and the question) runs through the model once instead of k times.
    prompt_pos: the prompt's position rows (prompt_positions; default one row 0..n-1). Returns
    (input_ids, position rows, segment (0: prompt, i: response i), scored), scored = (predictor position,
    token, response index) per response token: a response's first token is predicted from the prompt's end."""
    n_prompt = sum(1 for label in seqs[0][1] if label == IGNORE)
    prompt_pos = prompt_pos or [list(range(n_prompt))]
    ids, pos, seg, scored = list(seqs[0][0][:n_prompt]), [list(row) for row in prompt_pos], [0] * n_prompt, []
    first = max(max(row) for row in prompt_pos) + 1  # the position after the prompt, on every row
    for i, (full, _) in enumerate(seqs):
        response, start = full[n_prompt:], len(ids)
        scored += [(n_prompt - 1 if j == 0 else start + j - 1, tok, i) for j, tok in enumerate(response)]
        ids += response
        for row in pos:
            row += range(first, first + len(response))
        seg += [i + 1] * len(response)
    return ids, pos, seg, scored


def packed_batch(packs, pad_id, dtype=torch.float32):
    """Right-pads pack_responses' outputs into model inputs: input_ids and position_ids [B, T] ([3, B, T] for
    Qwen2.5-VL's three rows), a 4D
    additive attention mask [B, 1, T, T] (a token sees the earlier tokens of the prompt and of its own
    response), `keep` [B, T] marking the positions whose logits are needed, and `scored` = (index into
    the kept positions' logits, token, output slot) with slot = response_index * B + row, so the
    log-probs come out as [all first responses..., all second responses...]."""
    B, T, P = len(packs), max(len(p[0]) for p in packs), len(packs[0][1])
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((P, B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    rows, preds, toks, slots = [], [], [], []
    for b, (ids, pos, sg, scored) in enumerate(packs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        position_ids[:, b, :len(ids)] = torch.tensor(pos)
        seg[b, :len(sg)] = torch.tensor(sg)
        for pred, tok, i in scored:
            rows.append(b), preds.append(pred), toks.append(tok), slots.append(i * B + b)
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # a padding row sees itself: no all-masked softmax row (NaN)
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    keep = torch.zeros((B, T), dtype=torch.bool)
    keep[rows, preds] = True
    flat = keep.flatten().cumsum(0) - 1  # position (b, t) -> its row among the kept logits
    index = flat[torch.tensor(rows) * T + torch.tensor(preds)]
    position_ids = position_ids[0] if P == 1 else position_ids
    return input_ids, position_ids, mask, keep, (index, torch.tensor(toks), torch.tensor(slots))


def flat_batch(packs, pad_id=0, block=1):
    """pack_responses' outputs concatenated into one row, no padding between packs (03's --padding_free): input_ids
    and position_ids [1, T] or [3, 1, T] (each pack's positions its own), `doc` [1, T] (the pack of each token) and
    `seg` [1, T] (0: prompt, i: response i) from which attention.py builds the attention on the device, `keep` and
    `scored` as packed_batch's (slot = response_index * B + pack). block > 1: the row padded with pad_id to whole
    blocks, two at least (FlexAttention's: a run then compiles once, not per length); the tail is a pack of its own
    (doc -1), never scored."""
    B, P = len(packs), len(packs[0][1])
    ids, pos, doc, seg, preds, toks, slots = [], [[] for _ in range(P)], [], [], [], [], []
    for b, (p_ids, p_pos, p_seg, scored) in enumerate(packs):
        for pred, tok, i in scored:
            preds.append(len(ids) + pred), toks.append(tok), slots.append(i * B + b)
        ids += p_ids
        for row, p_row in zip(pos, p_pos):
            row += p_row
        seg += p_seg
        doc += [b] * len(p_ids)
    tail = 0 if block == 1 else max(2 * block, -(-len(ids) // block) * block) - len(ids)
    ids, doc, seg = ids + [pad_id] * tail, doc + [-1] * tail, seg + [0] * tail
    for row in pos:
        row += [0] * tail
    keep = torch.zeros((1, len(ids)), dtype=torch.bool)
    keep[0, preds] = True
    index = (keep.flatten().cumsum(0) - 1)[torch.tensor(preds)]
    as_row = lambda x: torch.tensor([x], dtype=torch.long)
    position_ids = as_row(pos[0]) if P == 1 else torch.tensor(pos, dtype=torch.long)[:, None]
    return as_row(ids), position_ids, as_row(doc), as_row(seg), keep, (index, torch.tensor(toks), torch.tensor(slots))


def pack_pairs(processor, examples, max_length, fmt=LLAVA_15, dtype=torch.float32, flat=False, row_block=1):
    """One packed micro-batch of CPU tensors from examples (image, prompt, [responses], earlier turns): per example one
    sequence [image + prompt, responses...] (pack_responses), padded (packed_batch) or, flat, all in one row
    (flat_batch, padded to whole blocks of row_block). A dict of the model's inputs (input_ids, position_ids,
    logits_to_keep, pixel_values and for Qwen2.5-VL image_grid_thw; attention_mask, or doc and seg for attention.py on
    the device), `scored`, `n_tokens`: the scored tokens (+EOS) per output slot, and `n_real`: the tokens of the packs
    (input_ids' size less padding)."""
    visions, packs = [], []
    for image, prompt, responses, history in examples:
        vision, seqs, _ = build_sequences(processor, image, prompt, responses, max_length, fmt, history)
        visions.append(vision)
        n_prompt = seqs[0][1].count(IGNORE)
        packs.append(pack_responses(seqs, prompt_positions(processor, seqs[0][0][:n_prompt], vision)))
    if flat:
        input_ids, position_ids, doc, seg, keep, scored = flat_batch(packs, processor.tokenizer.pad_token_id, row_block)
        attention = dict(doc=doc, seg=seg)
    else:
        input_ids, position_ids, mask, keep, scored = packed_batch(packs, processor.tokenizer.pad_token_id, dtype)
        attention = dict(attention_mask=mask)
    n_out = len(examples[0][2]) * len(examples)
    return dict(input_ids=input_ids, position_ids=position_ids, **attention, logits_to_keep=keep,
                **cat_images(visions), scored=scored, n_tokens=torch.bincount(scored[2], minlength=n_out),
                n_real=sum(len(p[0]) for p in packs))


def split_images(vision):
    """The image inputs of a batch, one image each (Qwen2.5-VL's patches are one block, image_grid_thw's
    t * h * w rows an image)."""
    if "image_grid_thw" not in vision:
        return [{"pixel_values": pv[None]} for pv in vision["pixel_values"]]
    grids = vision["image_grid_thw"]
    patches = vision["pixel_values"].split(grids.prod(-1).tolist())
    return [{"pixel_values": pv, "image_grid_thw": grids[i:i + 1]} for i, pv in enumerate(patches)]


def image_embeds(model, input_ids, vision, weaken=()):
    """Input embeddings with each image's projected features in its placeholder tokens (vision: a dict holding
    the image inputs, VISION_INPUTS). The vision encoder, projector and embeddings are frozen, so this runs
    once per batch (no grad) and serves the policy and the reference forward alike. `weaken`: (noise step,
    "features"|"pixels", seed) per image, each weakened (weaken_images) with noise from its own seeded
    generator, so that the policy, the reference and a resumed run all see the same weakened image."""
    with torch.no_grad():
        if weaken:
            features = []
            for one, (step, where, seed) in zip(split_images(vision), weaken):
                with weaken_images(model, step, where, torch.Generator().manual_seed(seed)):
                    features += model.get_image_features(**one).pooler_output
            features = torch.cat(features)
        else:
            features = torch.cat(model.get_image_features(**vision_inputs(vision)).pooler_output)
        embeds = model.get_input_embeddings()(input_ids)
        is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))


def packed_logps(logits, scored, n_out):
    """Summed log-probs per output slot from the kept positions' logits [N, V] (packed_batch's
    `scored`): logit - logsumexp at the scored tokens only, no log-softmax over all positions; in float32
    (float64 logits stay float64)."""
    index, toks, slots = (t.to(logits.device) for t in scored)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits[index, toks] - torch.logsumexp(logits, dim=-1)[index]
    return torch.zeros(n_out, device=logits.device, dtype=logits.dtype).index_add(0, slots, picked)


def response_logps(net, model, inputs, scored, n_out, embeds=None):
    """(summed response log-probs per output slot, the input embeddings) of a packed micro-batch
    (pack_pairs' model inputs, a padding-free row's attention made by attention.Kernel.inputs). net runs the
    language model (the policy, its DDP wrapper, or the
    reference: the model with its adapter disabled); the input embeddings, from model's frozen vision
    tower, projector and embedding table, are made once (unless given) and serve policy and reference
    alike. bf16 autocast on CUDA; no KV cache (2-3 GB at 7B, and nothing reads it)."""
    device = inputs["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if embeds is None:
            embeds = image_embeds(model, inputs["input_ids"], inputs)
        attention = {k: inputs[k] for k in ("attention_mask", "pack_masks", "flex_options") if k in inputs}
        logits = net(inputs_embeds=embeds, position_ids=inputs["position_ids"], logits_to_keep=inputs["logits_to_keep"],
                     use_cache=False, **attention).logits
    return packed_logps(logits, scored, n_out), embeds


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss (paper Eq. 4) per pair, with the implicit rewards
    beta * (log pi - log pi_ref) of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """IPO (Azar et al., 2023) per pair: (h - 1 / (2 beta))^2, h = the chosen's log-ratio log pi/pi_ref
    minus the rejected's; it regresses the margin to a fixed target instead of pushing it to
    infinity. Rewards as dpo_loss's."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def conditional_loss(policy_chosen, policy_chosen_weak, ref_chosen, ref_chosen_weak, beta):
    """mDPO's conditional term (Wang et al., 2024) per pair: the chosen answer given the real image
    preferred over the same answer given the weakened image, -log sigmoid(beta * [log pi/pi_ref(y_w | I)
    - log pi/pi_ref(y_w | I')]): a preference that text alone cannot satisfy."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_chosen_weak - ref_chosen_weak)))


def anchor_loss(policy_chosen, ref_chosen, beta):
    """mDPO's anchor per pair: -log sigmoid(beta * log pi/pi_ref(y_w)), which keeps the chosen answer's
    reward above zero (plain DPO may lower the chosen log-prob as long as the rejected falls faster)."""
    return -F.logsigmoid(beta * (policy_chosen - ref_chosen))


def preference_loss(policy, reference, n_tokens, *, loss="dpo", beta=0.1, length_normalize=False, sft_weight=0.0,
                    conditional_weight=0.0, anchor_weight=0.0, weak=None):
    """The whole objective of one micro-batch of B pairs: (loss, metrics), the metrics detached 0-d
    tensors (nothing waits for the device until they are logged). `loss` is the whole objective; each
    added term is also reported on its own (loss/sft, loss/anchor, loss/conditional).

    policy, reference, n_tokens: summed log-probs under the policy and the reference, and scored tokens
    (+EOS), of [B chosen..., B rejected...] (loss "sft": [B chosen], reference unused).
    loss: "dpo" (paper Eq. 4), "ipo", or "sft" (the chosen answers' NLL, the mean over the micro-batch's
    answer tokens, as LLaVA's fine-tuning). dpo and ipo take: length_normalize (each log-ratio divided
    by its response's token count, in every term), sft_weight (+ W x each chosen answer's per-token NLL),
    anchor_weight (+ W x anchor_loss), conditional_weight (+ W x conditional_loss, with weak = (policy,
    reference, n_tokens) of the chosen answers given the weakened image)."""
    B = len(policy) // (1 if loss == "sft" else 2)
    chosen = policy[:B]
    if loss == "sft":
        value = -chosen.sum() / n_tokens[:B].sum()
        return value, {"loss": value.detach(), "logps/chosen": chosen.detach().mean()}
    per = n_tokens.float() if length_normalize else torch.ones_like(policy)  # log-ratio per token or summed
    pol, ref = policy / per, reference / per
    objective = ipo_loss if loss == "ipo" else dpo_loss
    losses, r_chosen, r_rejected = objective(pol[:B], pol[B:], ref[:B], ref[B:], beta)
    terms = {}
    if sft_weight:
        terms["sft"] = (sft_weight, -chosen / n_tokens[:B])
    if anchor_weight:
        terms["anchor"] = (anchor_weight, anchor_loss(pol[:B], ref[:B], beta))
    if conditional_weight:
        weak_policy, weak_reference, weak_tokens = weak
        per_weak = weak_tokens.float() if length_normalize else 1.0
        terms["conditional"] = (conditional_weight, conditional_loss(pol[:B], weak_policy / per_weak, ref[:B],
                                                                     weak_reference / per_weak, beta))
    metrics = {}
    for name, (weight, term) in terms.items():
        losses = losses + weight * term
        metrics[f"loss/{name}"] = term.detach().mean()
    value = losses.mean()
    return value, {"loss": value.detach(), **metrics, "rewards/chosen": r_chosen.mean(),
                   "rewards/rejected": r_rejected.mean(), "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
                   "rewards/margins": (r_chosen - r_rejected).mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": policy[B:].detach().mean()}
