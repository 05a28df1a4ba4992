"""LLaVA-1.5 (llava-hf/llava-1.5-7b-hf), the paper's model: a CLIP ViT-L/14 at 336 px (576 image tokens, the
second-to-last layer's features, CLS dropped), a 2-layer MLP projector, Vicuna-7B (LLaMA). Its input format is the one
it was trained and evaluated with: LLaVA's conv_vicuna_v1 and square padding."""
import common
from families import Family, register


@register
class Llava(Family):
    model_type = "llava"
    name = "LLaVA-1.5"
    checkpoints = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf")
    processor_class = "LlavaProcessor"
    input_format = common.LLAVA_15
    fixed_image_tokens = True  # every image is resized to the same square
    seven_b = dict(lm_hidden=4096, lm_layers=32, lm_mlp=11008, lm_heads=32, lm_kv_heads=32, vision_hidden=1024,
                   vision_layers=24, vision_mlp=4096, vision_heads=16, image_size=336, patch_size=14,
                   vocab=32000, max_positions=4096, rms_norm_eps=1e-5)
    special_tokens = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
    tokenizer_tokens = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    conversation_text = common.VICUNA_SYSTEM + " USER: ASSISTANT:"
    chat_template = (  # llava-hf/llava-1.5's: "USER: <image>\n{question} ASSISTANT:"
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

    def processor_for(self, tokenizer, sizes):
        from transformers import CLIPImageProcessor, LlavaProcessor
        side = sizes["image_size"]
        ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=sizes["patch_size"],
                              vision_feature_select_strategy="default", chat_template=self.chat_template,
                              num_additional_image_tokens=1)

    def config_for(self, tokenizer, sizes):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
        vision = CLIPVisionConfig(hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_mlp"],
                                  num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                                  image_size=sizes["image_size"], patch_size=sizes["patch_size"], projection_dim=96)
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes["lm_hidden"], intermediate_size=sizes["lm_mlp"],
                           num_hidden_layers=sizes["lm_layers"], num_attention_heads=sizes["lm_heads"],
                           num_key_value_heads=sizes["lm_kv_heads"], max_position_embeddings=sizes.get("max_positions", 256),
                           **{k: sizes[k] for k in ("rms_norm_eps",) if k in sizes}, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                           image_seq_length=(sizes["image_size"] // sizes["patch_size"]) ** 2, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")
