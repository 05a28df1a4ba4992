"""LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-vicuna-7b-hf, llava-v1.6-mistral-7b-hf): LLaVA-1.5's CLIP and projector
at "anyres": an image is its base view plus the crops of the best-fitting grid (image_grid_pinpoints), each crop its
576 tokens, a learned newline after each row of crop features; so pixel_values are 5-D (image, crop, C, H, W) with
image_sizes, and an image's token count depends on its size. Its processor's own chat template at its own aspect (no
square padding)."""
import common
from families import register
from families.llava import Llava


@register
class LlavaNext(Llava):
    model_type = "llava_next"
    name = "LLaVA-NeXT"
    checkpoints = ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf")
    processor_class = "LlavaNextProcessor"
    input_format = common.TEMPLATE
    fixed_image_tokens = False  # by the image's size
    vision_keys = ("pixel_values", "image_sizes")
    seven_b = dict(Llava.seven_b, vocab=32064)

    def image_extra_tokens(self, processor, image, fmt):
        width, height = (common.pad_square(image, processor) if fmt.pad_square else image).size
        return processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0] - 1

    def cell_features(self, model, vision):
        # the base view of each image (its first crop row): the whole image at the encoder's size
        return super().cell_features(model, {"pixel_values": vision["pixel_values"][:, 0]})

    def projector_parameters(self, model):
        return super().projector_parameters(model) + [model.model.image_newline]

    def processor_for(self, tokenizer, sizes):
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        side = sizes["image_size"]
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                        image_grid_pinpoints=self.pinpoints(side))
        return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=sizes["patch_size"],
                                  vision_feature_select_strategy="default", chat_template=self.chat_template,
                                  num_additional_image_tokens=1)

    def pinpoints(self, side):
        """The checkpoints' grids (1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1 crops of the base side); a toy's up to 2 x 2."""
        grids = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)] if side >= 336 else [(1, 1), (1, 2), (2, 1), (2, 2)]
        return [[side * r, side * c] for r, c in grids]

    def config_for(self, tokenizer, sizes):
        from transformers import LlavaNextConfig
        base = super().config_for(tokenizer, sizes)
        return LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                               image_token_index=base.image_token_id, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_seq_length=base.image_seq_length,
                               image_grid_pinpoints=self.pinpoints(sizes["image_size"]))
