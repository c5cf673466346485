"""Native prompts on real tokenizer kinds: byte-level BPE (Qwen2, Llama 3) and Gemma's SentencePiece-style BPE.

``test_native_prompts.py`` renders chat templates with the debug models' WordLevel tokenizers, which split on
whitespace and never merge across a word. Released checkpoints ship byte-level BPE or SentencePiece-style
tokenizers, where a space belongs to the next word's token (``" red"``), newline runs are one token, text a
processor writes around an image block merges with the template's text next to it, and the tokenizer may add
BOS itself. Here each family gets such a tokenizer built in code: BPE trained on a small corpus of the
family's own chat text, with the family's special tokens as added tokens, wrapped in transformers' own
tokenizer class where it has one (``Qwen2Tokenizer``: NFC + Qwen's split regex + ByteLevel; ``GemmaTokenizer``:
``"▁"`` for spaces, no pre-split, byte fallback, newline runs as added tokens as in Gemma's tokenizer.json), and
the released checkpoint's chat template (each cited where it is defined). The tiny random model of the family
is built around it and saved like a checkpoint, so ``load_model`` finds the template and renders natively.

References kscale did not compute: transformers' ``processor.apply_chat_template(messages, tokenize=True)``
with the family's processor class built in code around the same tokenizer (token ids, pixels), the
processor's ``mm_token_type_ids`` (tags, as in ``test_families_other``), ``{% generation %}`` assistant masks
where the template has them (LLaVA-OneVision), and the tokenizer's own decoding of the answer tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from kscale.models import IMAGE, load_model
from kscale.models.inputs import Media, Sample, Turn
from kscale.models.registry import get_adapter
from kscale.spec import ModelSpec
from tests.unit.test_families_other import (_expected_tags, _gemma3_processor, _idefics3_processor,
                                            _llava_onevision_processor, _newline_positions)
from tests.unit.test_families_qwen import family_processor
from tests.unit.test_processors import _image

# -- the released checkpoints' chat templates

# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json; vendored verbatim e.g. in shell-nlp/gpt_server
# tests/test_chat_template.py (the same string kscale's QWEN_CHAT_TEMPLATE holds).
QWEN25_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Qwen/Qwen2-VL-7B-Instruct's chat_template.json is the same string as Qwen2.5-VL's (kscale's QWEN_CHAT_TEMPLATE
# is documented as Qwen2-VL's and serves both).
QWEN2_VL = QWEN25_VL
# Qwen/Qwen3-VL-*-Instruct chat_template.json (differs from 2.5's: no default system turn, tool calls, `{%-`
# whitespace control), verbatim as vendored in NVIDIA's cosmos tao-vl-reason dataset module
# (QWEN3VL_INSTRUCT_CHAT_TEMPLATE, "byte-identical to the chat templates shipped with ... Qwen/Qwen3-VL-8B-Instruct")
# and as llama-server logs it for Qwen3-VL-30B-A3B-Instruct (ikawrakow/ik_llama.cpp, an issue of 2025-11-07).
QWEN3_VL = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json, as transformers' own tests vendor it
# (huggingface/transformers tests/models/llava_next_video/test_processing_llava_next_video.py,
# prepare_processor_dict).
ONEVISION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# HuggingFaceM4/Idefics3-8B-Llama3's chat template: transformers' tests/models/idefics3/test_processing_idefics3.py
# (test_apply_chat_template) loads that checkpoint's processor and expects exactly this rendering
# ("<|begin_of_text|>User: ...<end_of_utterance>\nAssistant: ..."); the string is vendored e.g. as
# ModernVBert's DEFAULT_CHAT_TEMPLATE (its idefics3-derived processor).
IDEFICS3 = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type']"
    " == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# google/gemma-3-*-it: transformers' src/transformers/models/gemma3/convert_gemma3_weights.py, _CHAT_TEMPLATE
# (the template the conversion script saves with the checkpoints), verbatim.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# -- tokenizers trained in code

QUESTIONS = ["is the circle red or blue ?", "what color is the square ?", "describe the image .",
             "how many stars are there ?", "which shape is on the left ?"]
ANSWERS = ["red", "blue circle", "a red circle on the left .", "two", "the square"]


def _corpus(chat: str) -> list[str]:
    """The family's chat text around questions and answers (so the template's words merge), many times."""
    lines = [chat.format(q=q, a=a) for q in QUESTIONS for a in ANSWERS]
    return (lines + QUESTIONS + ANSWERS) * 4


def _train(tk, corpus: list[str], special: list[str], byte_level: bool) -> tuple[dict, list]:
    """Train ``tk``'s BPE model in place; its vocabulary (special tokens first, in order) and merges."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    tk.train_from_iterator(corpus, trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _byte_level(regex: str):
    """An untrained byte-level BPE with the split regex GPT-style tokenizers use (NFC as Qwen2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _qwen2(special: list[str], chat: str, eos: str):
    """Qwen2's tokenizer (Qwen2.5-VL's and LLaVA-OneVision-Qwen2's): byte-level BPE, no BOS."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _train(_byte_level(PRETOKENIZE_REGEX), _corpus(chat), special, byte_level=True)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=eos, pad_token="<|endoftext|>",
                         additional_special_tokens=special[1:])
    tok.padding_side = "right"
    return tok


# Llama 3's split regex (meta-llama/Meta-Llama-3-8B tokenizer.json): digits in runs of at most 3
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
IDEFICS_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<end_of_utterance>",
                   "<fake_token_around_image>", "<image>"]


def _llama3():
    """Idefics3-8B-Llama3's tokenizer kind: byte-level BPE that adds BOS itself (a TemplateProcessing
    post-processor, as Llama 3's tokenizer.json); the row/column markers and ``<global-img>`` are plain text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level(LLAMA3_REGEX)
    chat = "User:<image>{q}<end_of_utterance>\nAssistant: {a}<end_of_utterance>\n<row_1_col_2>\n\n<global-img>"
    _train(tk, _corpus(chat), IDEFICS_SPECIAL, byte_level=True)
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|reserved_special_token_0|>",
                                  additional_special_tokens=["<end_of_utterance>", "<fake_token_around_image>",
                                                             "<image>"])
    tok.padding_side = "right"
    return tok


GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _gemma():
    """Gemma 3's tokenizer kind (``GemmaTokenizer``): spaces become ``"▁"``, no pre-split (merges may cross
    words and newlines), byte fallback, BOS added by the tokenizer, EOS ``<eos>`` (a turn ends with
    ``<end_of_turn>``, a stop id of the generation config), newline runs as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    chat = "<start_of_turn>user\n\n\n<start_of_image>\n\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"
    vocab, merges = _train(tk, _corpus(chat), GEMMA_SPECIAL, byte_level=False)
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tok.add_tokens([AddedToken(t, special=True) for t in ("<start_of_turn>", "<end_of_turn>")], special_tokens=True)
    tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in range(1, 9)])
    tok.padding_side = "right"
    return tok


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n")
TOKENIZERS = {
    "qwen2_vl": lambda: _qwen2(QWEN_SPECIAL, QWEN_CHAT, "<|im_end|>"),
    "qwen2_5_vl": lambda: _qwen2(QWEN_SPECIAL, QWEN_CHAT, "<|im_end|>"),
    # Qwen3-VL's video text "<t seconds>" in the corpus, so " seconds" is one merged token as in Qwen's vocabulary
    "qwen3_vl": lambda: _qwen2(QWEN_SPECIAL, "<|im_start|>user\n<|vision_start|><0.5 seconds><|vision_start|>"
                               "<|vision_end|><1.5 seconds>{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n",
                               "<|im_end|>"),
    "llava_onevision": lambda: _qwen2(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                                      "<|im_start|>user <image>\n{q}<|im_end|><|im_start|>assistant \n{a}<|im_end|>",
                                      "<|im_end|>"),
    "idefics3": _llama3,
    "gemma3": _gemma,
}
TEMPLATES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN25_VL, "qwen3_vl": QWEN3_VL, "llava_onevision": ONEVISION, "idefics3": IDEFICS3, "gemma3": GEMMA3}
# where the end of a turn is not the tokenizer's EOS, the checkpoint's generation config lists it as a stop id
STOPS = {"idefics3": ["<|end_of_text|>", "<end_of_utterance>"], "gemma3": ["<eos>", "<end_of_turn>"]}
# the answer's tokens decoded: the assistant text (with the space the template writes before it, which a
# byte-level token carries) and the end-of-turn token
ANSWER_TEXT = {"qwen2_vl": "red<|im_end|>", "qwen2_5_vl": "red<|im_end|>", "qwen3_vl": "red<|im_end|>", "llava_onevision": "red<|im_end|>",
               "idefics3": " red<end_of_utterance>", "gemma3": "red<end_of_turn>"}
FAMILIES = list(TEMPLATES)
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_bpe_model(family: str, out) -> str:
    """The tiny ``family`` model saved with a trained BPE tokenizer and the released chat template."""
    tok = TOKENIZERS[family]()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, proc = get_adapter(family).debug_model(tok)
    if family == "idefics3":  # its debug model adds the row/global markers as tokens; the checkpoint's are text
        tok = TOKENIZERS[family]()
    if family in STOPS:
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids(STOPS[family])
    tok.chat_template = TEMPLATES[family]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            path = build_bpe_model(family, tmp_path_factory.mktemp(family))
            cache[family] = load_model(ModelSpec(path=path, device="cpu", dtype="float32"))
        return cache[family]
    return get


def _processor(family: str, lm):
    if family in QWEN:
        return family_processor(family, lm.info.path)
    return {"llava_onevision": _llava_onevision_processor, "idefics3": _idefics3_processor,
            "gemma3": _gemma3_processor}[family](lm)


def _sample(answer: bool = True) -> Sample:
    """One image and a question that holds the answer's word (an answer search from the wrong place finds it)."""
    turns = (Turn("user", (Media("image", 0), "is the circle red or blue ?")),)
    return Sample(turns + ((Turn("assistant", ("red",)),) if answer else ()), [_image(112, 84)])


def _messages(s: Sample) -> list[dict]:
    """transformers' message format, written here (not kscale's converter), pixels inline."""
    def part(p):
        return {"type": "image", "image": s.images[p.index]} if isinstance(p, Media) else {"type": "text", "text": p}
    return [{"role": t.role, "content": [part(p) for p in t.content]} for t in s.turns]


def _theirs(family, lm, s: Sample, **kw):
    return _processor(family, lm).apply_chat_template(_messages(s), chat_template=lm.prompt.text, tokenize=True,
                                                      return_dict=True, return_tensors="pt", **kw)


def test_the_tokenizers_are_what_real_checkpoints_ship(bpe) -> None:
    """The properties the WordLevel tests cannot exercise hold here, so the tests below see them."""
    qwen, idefics, gemma = bpe("qwen2_5_vl").tokenizer, bpe("idefics3").tokenizer, bpe("gemma3").tokenizer
    assert type(qwen).__name__ == "Qwen2Tokenizer" and type(gemma).__name__ == "GemmaTokenizer"
    assert qwen.bos_token is None and qwen("red").input_ids == qwen("red", add_special_tokens=False).input_ids
    assert idefics.convert_ids_to_tokens(idefics(" red", add_special_tokens=False).input_ids) == ["Ġred"]
    assert idefics("red").input_ids[0] == idefics.bos_token_id  # BOS from the tokenizer itself
    assert gemma("red").input_ids[0] == gemma.bos_token_id
    assert "\n\n\n" in gemma.convert_ids_to_tokens(gemma("user\n\n\nis", add_special_tokens=False).input_ids)
    assert len(idefics("<row_1_col_2>", add_special_tokens=False).input_ids) > 1  # plain text, several tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_native_tokens_and_tags_equal_apply_chat_template(bpe, family) -> None:
    lm = bpe(family)
    assert lm.prompt.kind == "native" and lm.prompt.text == TEMPLATES[family]
    for s, kw in ((_sample(), {}), (_sample(answer=False), {"add_generation_prompt": True})):
        ours = lm.adapter.batch(lm, [s], with_answers="add_generation_prompt" not in kw)
        theirs = _theirs(family, lm, s, processor_kwargs={"return_mm_token_type_ids": True}, **kw)
        assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
            lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
            lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
        assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"].to(ours.inputs["pixel_values"].dtype))
        theirs["image_token_id"] = _processor(family, lm).image_token_ids[0]  # the processor's reading of its mm ids
        want = _expected_tags(lm, theirs, _newline_positions(lm, ours.inputs))
        assert torch.equal(ours.modality_BT, want), (ours.modality_BT, want)
        assert (ours.image_index_BT[want == IMAGE] == 0).all() and (ours.image_index_BT[want != IMAGE] == -1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_span_is_the_assistant_text_and_its_end_of_turn(bpe, family) -> None:
    lm = bpe(family)
    b = lm.adapter.batch(lm, [_sample()])
    ids, mask = b.inputs["input_ids"][0], b.answer_mask_BT[0]
    where = torch.nonzero(mask).flatten()
    assert len(where) and (torch.diff(where) == 1).all()  # one run
    assert lm.tokenizer.decode(ids[mask]) == ANSWER_TEXT[family]
    assert int(where[-1]) == len(ids) - 1 - (family in QWEN + ("idefics3", "gemma3"))  # then "\n" or none
    if family == "llava_onevision":  # its template marks '\n' + answer with {% generation %}: transformers' mask
        theirs = _theirs(family, lm, _sample(), return_assistant_tokens_mask=True)["assistant_masks"][0].bool()
        assert lm.tokenizer.decode(ids[theirs]) == " \nred"  # "assistant " + "\n" + text: " \n" is one token
        eot = torch.zeros_like(theirs)
        eot[int(torch.nonzero(theirs).max()) + 1] = True  # the <|im_end|> after the generation block
        blank = torch.tensor([not lm.tokenizer.decode([i]).strip() for i in ids.tolist()])
        assert torch.equal(mask, (theirs | eot) & ~blank)


def _two_images(answer: bool = True) -> Sample:
    """Two images with text between them, named out of their list order (``images[1]`` first), so the
    processor's order (the messages') and ``Sample.images``' differ."""
    user = Turn("user", (Media("image", 1), "the left one , and", Media("image", 0), "the right one ?"))
    turns = (user,) + ((Turn("assistant", ("red",)),) if answer else ())
    return Sample(turns, [_image(112, 84), _image(57, 83, seed=1)])


def _blocks(mm: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The processor's image blocks, in its order: runs of ``mm_token_type_ids == 1``; where the template writes
    the images next to each other (LLaVA-OneVision renders all images first) one run, split evenly (untiled
    images of a multi-image sample are the same size)."""
    pos = torch.nonzero(mm == 1).flatten()
    runs = torch.tensor_split(pos, (torch.nonzero(torch.diff(pos) > 1).flatten() + 1).tolist())
    if len(runs) == 1 and n > 1:
        return list(runs[0].chunk(n))
    assert len(runs) == n, (len(runs), n)
    return list(runs)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_and_text_between_them_equal_apply_chat_template(bpe, family) -> None:
    lm = bpe(family)
    order = [1, 0]  # Sample.images index of the processor's first and second image
    for s, kw in ((_two_images(), {}), (_two_images(answer=False), {"add_generation_prompt": True})):
        ours = lm.adapter.batch(lm, [s], with_answers="add_generation_prompt" not in kw)
        theirs = _theirs(family, lm, s, processor_kwargs={"return_mm_token_type_ids": True}, **kw)
        assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
            lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
            lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
        for k in set(ours.inputs) & set(theirs) - {"input_ids"}:  # pixels (in the processor's order), grids, masks
            assert torch.equal(ours.inputs[k], torch.as_tensor(theirs[k]).to(ours.inputs[k].dtype)), k
        theirs["image_token_id"] = _processor(family, lm).image_token_ids[0]
        want = _expected_tags(lm, theirs, _newline_positions(lm, ours.inputs))
        assert torch.equal(ours.modality_BT, want), (ours.modality_BT, want)
        mm = theirs["mm_token_type_ids"] if "mm_token_type_ids" in theirs else theirs["token_type_ids"]
        index = torch.full_like(ours.image_index_BT[0], -1)
        for k, block in enumerate(_blocks(mm[0], len(order))):
            index[block] = order[k]
        index[want[0] != IMAGE] = -1
        assert torch.equal(ours.image_index_BT[0], index), (ours.image_index_BT[0], index)
        assert set(index[want[0] == IMAGE].tolist()) == {0, 1}
