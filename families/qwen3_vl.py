"""Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct): Qwen2.5-VL's layout, with deepstack: the ViT's features after a few of its
blocks (deepstack_visual_indexes) go through mergers of their own into the language model's first layers, added at the
image tokens after each. So the image enters the language model in several places, and features weakening noises each
of them. Its chat template has no default system turn; its multimodal rotary sections are interleaved (the model's
concern: the positions are the same rows)."""
from families import register
from families.qwen2_vl import Qwen2VL

TEMPLATE = (  # Qwen3-VL-Instruct's ChatML: a system turn only when given
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@register
class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    name = "Qwen3-VL"
    checkpoints = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct")
    processor_class = "Qwen3VLProcessor"
    seven_b = dict(lm_hidden=4096, lm_layers=36, lm_mlp=12288, lm_heads=32, lm_kv_heads=8, vision_hidden=1152,
                   vision_layers=27, vision_mlp=4304, vision_heads=16, image_size=336, patch_size=16,
                   vocab=151936, max_positions=262144, rms_norm_eps=1e-6, rope_theta=5e6)
    conversation_text = "system user assistant"
    chat_template = TEMPLATE

    def feature_modules(self, model):
        visual = model.model.visual
        return [*visual.deepstack_merger_list, visual.merger]

    def mrope_section(self, head_dim):
        """[24, 20, 20] at head_dim 128 (Qwen3-VL's), in proportion at another."""
        return [head_dim // 2 - 2 * (5 * head_dim // 32), 5 * head_dim // 32, 5 * head_dim // 32]

    def config_for(self, tokenizer, sizes):
        from transformers import Qwen3VLConfig
        depth = sizes["vision_layers"]
        grid = sizes["image_size"] // sizes["patch_size"]
        vision = dict(depth=depth, hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_mlp"],
                      num_heads=sizes["vision_heads"], patch_size=sizes["patch_size"], spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=sizes["lm_hidden"], num_position_embeddings=grid * grid,
                      # the checkpoints' blocks 8, 16, 24 feed the LM's layers 0, 1, 2; a small ViT's first two
                      deepstack_visual_indexes=[k for k in (8, 16, 24) if k < depth - 1] or [0, 1])
        text = self.text_config(tokenizer, sizes, head_dim=sizes["lm_hidden"] // sizes["lm_heads"])
        return Qwen3VLConfig(vision_config=vision, text_config=text, **self.special_ids(tokenizer))
