"""Gemma 3: a SigLIP tower pooled to ``mm_tokens_per_image`` soft tokens, Gemma 3 LM with q/k RMSNorm and a
RoPE per layer type (local sliding-window layers and global layers use different base frequencies).

An image becomes ``\\n\\n<start_of_image>``, the soft tokens, ``<end_of_image>\\n\\n``
(``Gemma3Processor.full_image_sequence``): soft tokens ``image``, begin/end of image ``special``, the
newlines text. ``token_type_ids`` (1 on soft tokens) go to the model, which lets each image's tokens attend
to each other both ways.

Keys: Gemma 3 normalises keys after ``k_proj`` (``k_norm``, per head) and rotates the normalised keys. The
pre-RoPE key is therefore ``k_norm``'s output, laid out (B, H, T, D). :func:`_tap` gives each attention
module an identity ``kscale_k_tap`` (and ``kscale_q_tap``) that a forward hook on the norm calls with a
(B, T, H, D) view of that output (no copy: the extraction's hook reads its kept rows through it, and a
reader that needs the tokens contiguous reshapes), only while something listens to the tap; ``key_modules`` and
``query_modules`` return the taps, so the extraction, attention and MaLoRA hooks read the keys the model
rotates, and the stored keys rotated by the layer's RoPE equal its KV cache. The RoPE of a layer is
:func:`kscale.models.rope.rotary_for_layer` of the model's rotary module.
"""

from __future__ import annotations

import torch

from kscale.models.registry import IMAGE, SPECIAL, Adapter, LoadedModel, register

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Gemma 3's chat template, shortened (the checkpoints' also fold a system turn into the first user turn)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% elif "
    "item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _tap(attn: torch.nn.Module, which: str) -> torch.nn.Module:
    """The identity module that sees ``attn.<which>_norm``'s (B, H, T, D) output as a (B, T, H, D) view (a
    transpose, no copy: copying it cost ~5% of the hooked forward); installed once."""
    name = f"kscale_{which}_tap"
    if not hasattr(attn, name):
        tap = torch.nn.Identity()
        attn.add_module(name, tap)

        def forward_to_tap(_mod, _inp, out_BHTD):
            if tap._forward_hooks:  # nobody listens: not called
                tap(out_BHTD.transpose(1, 2))
        getattr(attn, f"{which}_norm").register_forward_hook(forward_to_tap)
    return getattr(attn, name)


@register
class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_class = "Gemma3ForConditionalGeneration"
    key_source = "k_norm"  # the key is k_norm(k_proj(x)), seen through the tap
    default_template = "<bos><start_of_turn>user\n{image}{text}<end_of_turn>\n<start_of_turn>model\n"
    debug_tokens = {"special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, SOFT],
                    "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<end_of_turn>",
                    # the checkpoints' tokenizer names these (Gemma3Processor reads the attributes)
                    "extra_special_tokens": {"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT}}
    debug_chat_template = GEMMA3_CHAT_TEMPLATE

    def debug_model(self, tokenizer):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>"]},
                                     replace_extra_special_tokens=False)
        text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=4096, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                query_pre_attn_scalar=16, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        cfg = Gemma3Config(
            text_config=text,
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=56, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        proc = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
        model = Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # initialised to zeros: every image would give the same (zero) features
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
        return model, proc

    def key_modules(self, model) -> list[torch.nn.Module]:
        return [_tap(layer.self_attn, "k") for layer in self.decoder_layers(model)]

    def query_modules(self, model) -> list[torch.nn.Module]:
        return [_tap(layer.self_attn, "q") for layer in self.decoder_layers(model)]

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images=images, return_tensors="pt")
        n = loaded.model.config.mm_tokens_per_image
        return {"pixel_values": out["pixel_values"].to(loaded.dtype)}, [n] * len(images)

    def image_block(self, loaded: LoadedModel, n_tokens: int) -> tuple[list[int], list[int]]:
        tok, cfg = loaded.tokenizer, loaded.model.config
        ids = [cfg.boi_token_id] + [cfg.image_token_id] * n_tokens + [cfg.eoi_token_id]
        return ids, [IMAGE if i == cfg.image_token_id else SPECIAL for i in ids]

    def media_text(self, loaded: LoadedModel, kind: str) -> tuple[str, str]:
        return "\n\n", "\n\n"  # Gemma3Processor's full_image_sequence is "\n\n" + block + "\n\n"

    def chat_placeholder(self, loaded: LoadedModel, kind: str) -> str:
        return loaded.tokenizer.boi_token  # Gemma3Processor replaces <start_of_image> with the whole block

    def extra_inputs(self, input_ids_BT: torch.Tensor, config) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids_BT == config.image_token_id).long()}  # image blocks: bidirectional
