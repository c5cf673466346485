"""PaliGemma: a SigLIP tower whose patches are the image tokens (no merging), Gemma LM with a prefix-LM mask.

The prompt is ``<image>`` x N, BOS, the text and a newline (``PaliGemmaProcessor``); the image and the prompt
attend to each other both ways, the answer causally. The model learns which tokens form the prefix from
``token_type_ids`` (0 prefix, 1 answer): :meth:`PaliGemmaAdapter.batch` passes them, from the answer spans,
so keys are those of the model as it runs (without them the model falls back to a causal mask).

PaliGemma has no chat template; its built-in template is the processor's layout, and :meth:`PaliGemmaAdapter._plan`
tokenises as the processor does: the prompt text in one call, the answer (``suffix``) and EOS in another, with no
space before it. With the tokenizers the checkpoints ship (Gemma's SentencePiece-style BPE, which merges across
words and newlines) tokenising the template's pieces one by one gave other ids (tests/unit/test_native_bpe.py).
"""

from __future__ import annotations

import torch

from kscale.models.inputs import Media, Sample
from kscale.models.registry import Adapter, Batch, LoadedModel, register


@register
class PaliGemmaAdapter(Adapter):
    family = "paligemma"
    model_class = "PaliGemmaForConditionalGeneration"
    default_template = "{image}<bos>{text}\n"
    debug_tokens = {"special": ["<pad>", "<eos>", "<bos>", "<image>"], "pad_token": "<pad>", "bos_token": "<bos>",
                    "eos_token": "<eos>", "additional_special_tokens": ["<image>"]}

    def debug_model(self, tokenizer):
        from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=56, patch_size=14)
        cfg = PaliGemmaConfig(
            vision_config=vision,
            text_config=GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=64, hidden_size=64,
            vocab_size=len(tokenizer),
        )
        proc = SiglipImageProcessorPil(size={"height": 56, "width": 56})
        proc.image_seq_length = (vision.image_size // vision.patch_size) ** 2  # as in the checkpoints' config
        return PaliGemmaForConditionalGeneration(cfg), proc

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images=images, return_tensors="pt")
        n = loaded.model.config.text_config.num_image_tokens
        return {"pixel_values": out["pixel_values"].to(loaded.dtype)}, [n] * len(images)

    def image_block(self, loaded: LoadedModel, n_tokens: int) -> list[int]:
        return [loaded.model.config.image_token_id] * n_tokens

    def _plan(self, tok, template: str, sample: Sample) -> list:
        """As ``PaliGemmaProcessor`` tokenises: the prompt's text between media (BOS, the question, ``"\\n"``) in
        one call, so a BPE tokenizer merges across the template's pieces as the processor's single string does;
        an answer as the pair's second text, ``suffix + EOS`` on its own (no space before it)."""
        plan: list = []
        text: list[str] = []

        def flush() -> None:
            if text:
                plan.append((tok("".join(text), add_special_tokens=False).input_ids, False))
                text.clear()

        for turn in sample.turns:
            if turn.role == "assistant":
                flush()
                plan.append((tok(turn.text + tok.eos_token, add_special_tokens=False).input_ids, True))
                continue
            for part in self._render_user(template, turn.content) if turn.role == "user" else [turn.text]:
                if isinstance(part, Media):
                    flush()
                    plan.append(part)
                else:
                    text.append(part)
        flush()
        return plan

    def batch(self, loaded: LoadedModel, samples: list[Sample], with_answers: bool = True) -> Batch:
        out = super().batch(loaded, samples, with_answers)
        out.inputs["token_type_ids"] = out.answer_mask_BT.long()  # 0: the bidirectional prefix, 1: the answer
        return out
