"""Gemma 3 (google/gemma-3-12b-it, gemma-3-4b-it): a SigLIP encoder at 896 px whose patches are average-pooled to 256
image tokens, Gemma 3 as the language model. What differs: an image's tokens attend to each other both ways (the rest
stays causal), five of every six layers attend within a sliding window, the image is written <start_of_image> in the
text and becomes boi + 256 soft tokens + eoi, the template writes BOS itself, answers end with <end_of_turn>, and the
processor takes one list of images per prompt."""
import torch

import common
from families import Family, register

TEMPLATE = (  # google/gemma-3-*-it's (its role alternation checks left out): the system text folded into the first turn
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")


@register
class Gemma3(Family):
    model_type = "gemma3"
    name = "Gemma 3"
    checkpoints = ("google/gemma-3-12b-it", "google/gemma-3-4b-it", "google/gemma-3-27b-it")
    processor_class = "Gemma3Processor"
    bidirectional_images = True
    token_type_key = "token_type_ids"  # the image block in the model's own masks
    fixed_image_tokens = True
    seven_b = dict(lm_hidden=3840, lm_layers=48, lm_mlp=15360, lm_heads=16, lm_kv_heads=8, head_dim=256,
                   sliding_window=1024, full_every=6, vision_hidden=1152, vision_layers=27, vision_mlp=4304,
                   vision_heads=16, image_size=896, patch_size=14, image_tokens=256, vocab=262208,
                   max_positions=131072)
    special_tokens = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                      "<end_of_image>", "<image_soft_token>")
    tokenizer_tokens = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", extra_special_tokens={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    conversation_text = "user model"
    chat_template = TEMPLATE

    def encode(self, processor, texts, images):
        return processor(text=texts, images=[[image] for image in images], return_tensors="pt", padding=True,
                         add_special_tokens=common.adds_bos(processor.tokenizer, texts[0]))

    def eos_token_id(self, tokenizer):
        return tokenizer.convert_tokens_to_ids("<end_of_turn>")

    def prefill_inputs(self, enc):
        return {"token_type_ids": enc["token_type_ids"]}  # the image block, both ways

    def cell_features(self, model, vision):
        # the patches pooled as the projector pools them (2 x 2 here: 8 px patches, 16 px cells), row-major
        x = model.model.vision_tower(pixel_values=vision["pixel_values"]).last_hidden_state
        side = int(x.shape[1] ** 0.5)
        x = x.view(len(x), side, side, -1).permute(0, 3, 1, 2)
        return torch.nn.functional.avg_pool2d(x, side // 4).flatten(2).transpose(1, 2)

    def processor_for(self, tokenizer, sizes):
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        ip = Gemma3ImageProcessorPil(size={"height": sizes["image_size"], "width": sizes["image_size"]})
        return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, chat_template=self.chat_template,
                               image_seq_length=sizes["image_tokens"])

    def config_for(self, tokenizer, sizes):
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig
        head_dim = sizes.get("head_dim", sizes["lm_hidden"] // sizes["lm_heads"])
        every = sizes.get("full_every", 6)  # one layer in `every` attends to the whole sequence, the others in a window
        text = Gemma3TextConfig(
            vocab_size=len(tokenizer), hidden_size=sizes["lm_hidden"], intermediate_size=sizes["lm_mlp"],
            num_hidden_layers=sizes["lm_layers"], num_attention_heads=sizes["lm_heads"],
            num_key_value_heads=sizes["lm_kv_heads"], head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=sizes["sliding_window"], max_position_embeddings=sizes.get("max_positions", 512),
            layer_types=["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                         for i in range(sizes["lm_layers"])],
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        vision = SiglipVisionConfig(hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_mlp"],
                                    num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                                    image_size=sizes["image_size"], patch_size=sizes["patch_size"])
        ids = tokenizer.convert_tokens_to_ids
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=sizes["image_tokens"],
                            image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                            eoi_token_index=ids("<end_of_image>"))
