"""Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct): Qwen2-VL's design with a windowed ViT (full attention in a few blocks)
and SwiGLU; the same processor, positions and weakening point (before the patch merger)."""
from families import register
from families.qwen2_vl import Qwen2VL


@register
class Qwen25VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    name = "Qwen2.5-VL"
    checkpoints = ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")
    processor_class = "Qwen2_5_VLProcessor"
    seven_b = dict(Qwen2VL.seven_b, vision_mlp=3420)

    def config_for(self, tokenizer, sizes):
        from transformers import Qwen2_5_VLConfig
        depth = sizes["vision_layers"]
        # windows of 8 x 8 patches (112 px at 14 px patches); full attention in every 8th block (the last at least)
        vision = dict(depth=depth, hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_mlp"],
                      num_heads=sizes["vision_heads"], patch_size=sizes["patch_size"], spatial_merge_size=2,
                      temporal_patch_size=2, window_size=8 * sizes["patch_size"], out_hidden_size=sizes["lm_hidden"],
                      fullatt_block_indexes=[k for k in (7, 15, 23, 31) if k < depth] or [depth - 1])
        return Qwen2_5_VLConfig(vision_config=vision, text_config=self.text_config(tokenizer, sizes),
                                **self.special_ids(tokenizer))
