"""What differs between model families, in one place: a family is a small class in a file of this folder, registered by
its checkpoints' `model_type` (config.json), declaring its input format, its image inputs and how they split per
image, where image weakening hooks, its image-token count, its positions, what its packed attention must honour,
what stays out of 4-bit, and the architecture's config from sizes (the toy world's and the bench's 7B-class shape).
Everything else is shared (common.py, loading.py, generation.py, attention.py). `Family`'s defaults are the plain case
(one image = one row of pixel_values, features into a projector, 1-D positions, causal attention); a family overrides
what differs. docs/other_models.md says how to add one."""
import importlib
import json
import os
import pkgutil

import torch

import common

FAMILIES = {}  # model_type -> the family's instance


def register(cls):
    FAMILIES[cls.model_type] = cls()
    return cls


class Family:
    model_type = None  # config.json's model_type
    name = None  # for messages and docs
    checkpoints = ()  # hub ids it is written for (docs, and the family of a hub id not yet downloaded)
    processor_class = None  # its processor's class name (the family of a processor)
    input_format = common.TEMPLATE  # the input format its checkpoints were trained with
    vision_keys = ("pixel_values",)  # the processor's image inputs the vision encoder reads
    token_type_key = None  # the input that marks the image tokens, where the model's own forward wants it
    bidirectional_images = False  # an image's tokens attend to each other both ways (Gemma 3)
    # kept out of NF4 with --load_in_4bit, named from the model's root (transformers matches a bare name as one module)
    skip_4bit = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    seven_b = {}  # the sizes of the family's 7B-class checkpoint (bench/gpu_check.py), config_for's keys

    # ---- processor and text

    def load_processor(self, name):
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(name)

    def save_processor(self, processor, folder):
        processor.save_pretrained(folder)

    def encode(self, processor, texts, images):
        """The processor's inputs for prompts with one image each (the rendered text may start with BOS itself)."""
        return processor(text=texts, images=images, return_tensors="pt", padding=True,
                         add_special_tokens=common.adds_bos(processor.tokenizer, texts[0]))

    def image_token_id(self, config):
        return config.image_token_id

    def eos_token_id(self, tokenizer):
        """The token that ends an answer (what generation stops at; scored after each response)."""
        return tokenizer.eos_token_id

    fixed_image_tokens = False  # every image becomes the same number of tokens (measured once per processor)

    def image_extra_tokens(self, processor, image, fmt):
        """How many more tokens than its placeholder an image becomes in the prompt, measured by the processor (a
        family with fixed_image_tokens takes any image: image None)."""
        if self.fixed_image_tokens:
            if not hasattr(processor, "_bpo_image_extra"):
                from PIL import Image
                processor._bpo_image_extra = self.measure_image_tokens(processor, Image.new("RGB", (64, 64)))
            return processor._bpo_image_extra
        return self.measure_image_tokens(processor, common.pad_square(image, processor) if fmt.pad_square else image)

    def measure_image_tokens(self, processor, image):
        ph = processor.image_token
        return len(self.encode(processor, [ph], [image])["input_ids"][0]) - len(common.tokenize(processor.tokenizer, ph))

    # ---- images

    def split_images(self, vision):
        """A batch's image inputs, one dict an image."""
        return [{k: vision[k][i:i + 1] for k in self.vision_keys} for i in range(len(vision["pixel_values"]))]

    def cat_images(self, visions):
        """Several examples' image inputs as one batch's."""
        return {k: torch.cat([v[k] for v in visions]) for k in visions[0]}

    def watch_image_rows(self, model, rows):
        """Hooks that append, at each vision forward, the rows of the features (the feature modules' input) each image
        makes, for a per-image noise scale; none: one row an image (LLaVA-NeXT's rows are its crops)."""
        return []

    def feature_modules(self, model):
        """The modules whose input is the vision encoder's features for the language model ("features" weakening
        noises each one's input: every place the image enters the language model)."""
        return [model.model.multi_modal_projector]

    def pixel_module(self, model):
        """The module that reads the normalised pixels ("pixels" weakening), and the name of its pixel argument."""
        return model.model.vision_tower, "pixel_values"

    def projector_parameters(self, model):
        """What maps vision features into the language model (the toy trains it in its alignment stage)."""
        return [p for m in self.feature_modules(model) for p in m.parameters()]

    def image_features(self, model, vision):
        """The vision encoder's output for these images, as the model's forward takes it (mm_encoder_outputs)."""
        return model.get_image_features(**{k: vision[k] for k in self.vision_keys}, return_dict=True)

    # ---- positions

    def prompt_positions(self, processor, prompt_ids, vision):
        """The position rows of one unpadded prompt with its image: one row 0..n-1, or several (multimodal rotary)."""
        return [list(range(len(prompt_ids)))]

    def generation_positions(self, model, enc):
        """Position ids of a left-padded prompt batch (the processor's outputs), as the model's generate makes them."""
        return (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def prefill_inputs(self, enc):
        """What else a prefill forward with precomputed image features needs from the processor's outputs."""
        return {}

    # ---- attention

    def sliding_window(self, text_config):
        """The window of its sliding-attention layers (transformers passes `sliding_window` to those layers), or
        None: every layer full."""
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
            return text_config.sliding_window
        return None

    # ---- built models: the toy world's and the bench's

    special_tokens = ()  # a word-level tokenizer's special tokens for this family (ids in this order)
    tokenizer_tokens = {}  # the tokenizer's named tokens: bos_token, eos_token, pad_token, ...
    chat_template = None  # the family's chat template as its checkpoints carry it

    def processor_for(self, tokenizer, sizes):
        """The family's processor around a built tokenizer, for images of sizes["image_size"] px."""
        raise NotImplementedError

    def config_for(self, tokenizer, sizes):
        """The architecture's config at these sizes (lm_hidden, lm_layers, lm_mlp, lm_heads, lm_kv_heads, vision_hidden,
        vision_layers, vision_mlp, vision_heads, image_size, patch_size)."""
        raise NotImplementedError

    def cell_features(self, model, vision):
        """The features the language model's side reads, one row per 16 px cell of a 64 px image, [images, 16, D]
        (the toy pretrains its vision encoder on them: it stands in for a pretrained one). Default: the vision
        tower's second-to-last layer without CLS (LLaVA's)."""
        return model.model.vision_tower(vision["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]

    def cell_dim(self, config):
        return config.vision_config.hidden_size

    def token_types(self, input_ids, config):
        """The model's own inputs marking the image tokens (its plain forward's), for these ids."""
        if self.token_type_key is None:
            return {}
        return {self.token_type_key: (input_ids == self.image_token_id(config)).int()}


def image_features(model, vision, weaken=()):
    """The vision encoder's output for a batch's images (vision: a dict holding the family's image inputs), as the
    model's forward takes it (mm_encoder_outputs: the features each image token gets, and where a family feeds the
    image into later layers too, those: Qwen3-VL's deepstack). The vision encoder and projector are frozen, so this
    runs once per batch (no grad) and serves the policy and the reference forward alike. `weaken`: (noise step,
    "features"|"pixels", seed) per image, each weakened (common.weaken_images) with noise from its own seeded generator,
    so that the policy, the reference and a resumed run all see the same weakened image."""
    family = family_of(model)
    with torch.no_grad():
        if not weaken:
            return family.image_features(model, vision)
        outputs = []
        for one, (step, where, seed) in zip(family.split_images(vision), weaken):
            with common.weaken_images(model, step, where, torch.Generator().manual_seed(seed)):
                outputs.append(family.image_features(model, one))
        return join_images(outputs)


def join_images(outputs):
    """Several images' encoder outputs as one batch's, in what a forward reads of them: pooler_output (a tensor of
    images, or a sequence with a tensor an image) and, where present, deepstack_features (a list over layers of such
    sequences: Qwen3-VL's)."""
    def join(values):
        return torch.cat(values) if torch.is_tensor(values[0]) else tuple(x for v in values for x in v)
    fields = {"pooler_output": join([o.pooler_output for o in outputs])}
    if getattr(outputs[0], "deepstack_features", None) is not None:
        fields["deepstack_features"] = [join(layer) for layer in zip(*(o.deepstack_features for o in outputs))]
    return type(outputs[0])(**fields)


def model_type(name):
    """config.json's model_type of a checkpoint folder or hub id, without the network where it can be helped: a
    folder's, else the hub cache's, else the family whose checkpoints the id names; None when none of them tells."""
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path) and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name, "config.json")
    if isinstance(path, str) and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("model_type")
    return next((f.model_type for f in FAMILIES.values() if name in f.checkpoints), None)


def family_of(name_or_model):
    """The family of a model, its config, its processor, or a checkpoint's name (config.json's model_type; a hub id
    neither local nor a known checkpoint is asked of the hub). An unsupported model_type exits with a one-line error."""
    if hasattr(name_or_model, "image_processor"):  # a processor, by its class
        kind = type(name_or_model).__name__
        found = [f for f in FAMILIES.values() if f.processor_class == kind]
        if not found:
            import sys
            sys.exit(f"error: a {kind} is not the processor of a supported family ({', '.join(sorted(FAMILIES))})")
        return found[0]
    config = getattr(name_or_model, "config", name_or_model)
    kind = getattr(config, "model_type", None) if not isinstance(config, str) else model_type(config)
    if kind is None and isinstance(config, str):
        from transformers import AutoConfig
        try:
            kind = AutoConfig.from_pretrained(config).model_type
        except OSError as e:
            import sys
            sys.exit(f"error: --model {config}: no config.json to read its model_type ({str(e).splitlines()[0]})")
    if kind not in FAMILIES:
        import sys
        sys.exit(f"error: {config if isinstance(config, str) else 'the model'} is a {kind!r} model; supported "
                 f"model_types: {', '.join(sorted(FAMILIES))} (docs/other_models.md says how to add one)")
    return FAMILIES[kind]


for _module in pkgutil.iter_modules(__path__):  # every family file registers itself
    importlib.import_module(f"{__name__}.{_module.name}")
