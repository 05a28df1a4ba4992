"""Qwen2-VL (Qwen/Qwen2-VL-7B-Instruct): a ViT at its own (dynamic) resolution whose patch merger joins 2 x 2 patches
into one image token, Qwen2 as the language model with multimodal rotary positions (temporal, height, width rows).
Qwen2.5-VL and Qwen3-VL build on it (their files)."""
import common
from families import Family, register

SYSTEM = "You are a helpful assistant."
# Qwen2-VL/Qwen2.5-VL-Instruct's ChatML: its default system turn, the image as <|vision_start|><|image_pad|><|vision_end|>
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + SYSTEM + "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def mrope_positions(input_ids, image_token_id, grid_thw, merge_size):
    """Multimodal rotary positions of one unpadded sequence, as rows [temporal, height, width] (the model's
    get_rope_index for images): a text token's position counts up on all three; an image's tokens (one per
    merge_size x merge_size patches, row-major) sit at the image's start plus their (t, h, w) cell, and the text after
    it continues from the start plus the longer side in cells."""
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


@register
class Qwen2VL(Family):
    model_type = "qwen2_vl"
    name = "Qwen2-VL"
    checkpoints = ("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-2B-Instruct")
    processor_class = "Qwen2VLProcessor"
    vision_keys = ("pixel_values", "image_grid_thw")
    token_type_key = "mm_token_type_ids"  # the forward's multimodal positions need it
    skip_4bit = ("model.visual", "lm_head")
    seven_b = dict(lm_hidden=3584, lm_layers=28, lm_mlp=18944, lm_heads=28, lm_kv_heads=4, vision_hidden=1280,
                   vision_layers=32, vision_mlp=5120, vision_heads=16, image_size=336, patch_size=14,
                   vocab=152064, max_positions=32768, rms_norm_eps=1e-6, rope_theta=1e6)
    special_tokens = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>")
    tokenizer_tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    conversation_text = SYSTEM + " system user assistant"
    chat_template = TEMPLATE

    # ---- processor: for images only where torchvision is missing (the video processor needs it, and the processor's
    # constructor insists on one): the checkpoint's tokenizer, chat template and the PIL image processor

    def processor_cls(self):
        import transformers
        return getattr(transformers, self.processor_class)

    def assemble(self, tokenizer, image_processor, chat_template):
        """The family's processor without a video processor: its own constructor, the class check skipped."""
        from unittest import mock

        from transformers.processing_utils import ProcessorMixin
        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
            return self.processor_cls()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                           chat_template=chat_template)

    def load_processor(self, name):
        import os

        from transformers.utils import is_torchvision_available
        if is_torchvision_available():
            return super().load_processor(name)
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        tokenizer = AutoTokenizer.from_pretrained(name)
        template = os.path.join(name, "chat_template.jinja")
        return self.assemble(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(name),
                             open(template).read() if os.path.isfile(template) else tokenizer.chat_template)

    def save_processor(self, processor, folder):
        """As the family's checkpoints hold it; without its video half (load_processor's), as tokenizer, image
        processor and chat template, which AutoProcessor reads back where torchvision is installed."""
        import json
        import os
        if processor.video_processor is not None:
            return processor.save_pretrained(folder)
        processor.tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(processor.chat_template)
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"processor_class": self.processor_class}, f)

    def image_extra_tokens(self, processor, image, fmt):
        ip = processor.image_processor
        width, height = (common.pad_square(image, processor) if fmt.pad_square else image).size
        return ip.get_number_of_image_patches(height, width, {}) // ip.merge_size ** 2 - 1

    # ---- images: one block of patch rows, image_grid_thw's t * h * w rows an image

    def split_images(self, vision):
        grids = vision["image_grid_thw"]
        patches = vision["pixel_values"].split(grids.prod(-1).tolist())
        return [{"pixel_values": pv, "image_grid_thw": grids[i:i + 1]} for i, pv in enumerate(patches)]

    def watch_image_rows(self, model, rows):
        return [model.model.visual.register_forward_pre_hook(
            lambda _mod, args, kwargs: rows.append(kwargs["grid_thw"].prod(-1).tolist()), with_kwargs=True)]

    def feature_modules(self, model):
        return [model.model.visual.merger]  # its input: the ViT's patch features, before the 2 x 2 merge

    def pixel_module(self, model):
        return model.model.visual, "hidden_states"

    # ---- positions

    def prompt_positions(self, processor, prompt_ids, vision):
        return mrope_positions(prompt_ids, processor.image_token_id, vision["image_grid_thw"],
                               processor.image_processor.merge_size)

    def generation_positions(self, model, enc):
        return model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                          attention_mask=enc["attention_mask"])[0]

    # ---- built models

    def processor_for(self, tokenizer, sizes):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        # patches merged 2 x 2; pixels bounded so that an image of image_size px height keeps its size (4:3 at most)
        side, patch = sizes["image_size"], sizes["patch_size"]
        ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=(4 * patch) ** 2,
                                      max_pixels=side * side * 4 // 3)
        return self.assemble(tokenizer, ip, self.chat_template)

    def mrope_section(self, head_dim):
        """The split of a head's rotary frequencies over (temporal, height, width): [16, 24, 24] at head_dim 128, in
        proportion at another."""
        return [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]

    def text_config(self, tokenizer, sizes, **extra):
        head_dim = sizes["lm_hidden"] // sizes["lm_heads"]
        return dict(vocab_size=len(tokenizer), hidden_size=sizes["lm_hidden"], intermediate_size=sizes["lm_mlp"],
                    num_hidden_layers=sizes["lm_layers"], num_attention_heads=sizes["lm_heads"],
                    num_key_value_heads=sizes["lm_kv_heads"], max_position_embeddings=sizes.get("max_positions", 256),
                    **{k: sizes[k] for k in ("rms_norm_eps",) if k in sizes},  # else the config's default
                    rope_parameters={"rope_type": "default", "mrope_section": self.mrope_section(head_dim),
                                     "rope_theta": sizes.get("rope_theta", 10000.0)},
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, **extra)

    def cell_features(self, model, vision):
        # the merged 2 x 2 patches: one token per 16 px cell at 8 px patches
        out = model.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
        return out.view(len(vision["image_grid_thw"]), -1, out.shape[-1])

    def cell_dim(self, config):
        return config.text_config.hidden_size

    def special_ids(self, tokenizer):
        ids = tokenizer.convert_tokens_to_ids
        return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))

    def config_for(self, tokenizer, sizes):
        from transformers import Qwen2VLConfig
        vision = dict(depth=sizes["vision_layers"], embed_dim=sizes["vision_hidden"], hidden_size=sizes["lm_hidden"],
                      mlp_ratio=sizes["vision_mlp"] // sizes["vision_hidden"], num_heads=sizes["vision_heads"],
                      patch_size=sizes["patch_size"], spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(vision_config=vision, text_config=self.text_config(tokenizer, sizes),
                             **self.special_ids(tokenizer))
