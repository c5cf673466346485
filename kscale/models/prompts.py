"""Which prompt a model's samples are rendered with, and rendering through a checkpoint's own chat template.

Three kinds, chosen once per job by :func:`resolve_prompt` (the workers' :meth:`Adapter.load` and the
driver's store attributes call it, so the store records the very template the tokens were made with):

- ``override``: ``model.prompt_template`` (kscale's ``"{image}{text}"`` string, :mod:`kscale.models.inputs`);
- ``native``: the checkpoint's chat template (Jinja), what the model was trained on: the processor's
  (``chat_template.jinja`` / ``chat_template.json`` beside the weights) or else the tokenizer's;
- ``built-in``: the family's ``Adapter.default_template`` where the checkpoint has no chat template (the
  tiny ``debug:`` models: the tokens kscale always made).

Native rendering (:func:`plan_native`) follows transformers' ``ProcessorMixin.apply_chat_template``: the
sample's turns become messages (content parts ``{"type": "image"}``, ``{"type": "video"}``, ``{"type":
"text", "text": ...}``), ``render_jinja_template`` renders them with the tokenizer's special tokens, and the
string is tokenised in one call (``add_special_tokens`` unless it starts with BOS, as the processor does).
Each media placeholder the template wrote (:meth:`Adapter.chat_placeholder`; the k-th of a kind is the k-th
of that kind in the messages, as the processor hands out pixels) becomes the sample's :class:`Media`, which
``Adapter.batch`` expands to the family's block. Plain text a processor writes around each block
(:meth:`Adapter.media_text`: Gemma 3's ``"\\n\\n"``) is put into the string before tokenising, so a BPE
tokenizer merges it with the template's neighbouring text (``"\\n" + "\\n\\n"`` is one token) as the processor's
single call does; a block itself starts and ends with added tokens, which no merge crosses.

The answer span: every token that overlaps an assistant turn's text (a byte-level BPE token ``" red"`` carries
the space before the answer), found after the rendered turns before it, and the end-of-turn token right after
it where it is one of the checkpoint's stop tokens (the tokenizer's EOS and ``generation_config.eos_token_id``:
Gemma 3's ``<end_of_turn>``, Qwen's ``<|im_end|>``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kscale.models.inputs import Media, Sample

KINDS = ("native", "override", "built-in")


@dataclass(frozen=True)
class PromptTemplate:
    kind: Literal["native", "override", "built-in"]
    text: str  # Jinja source (native) or kscale's template string

    def attrs(self) -> dict:
        """What the store records (root attribute ``prompt_template``)."""
        return {"kind": self.kind, "template": self.text,
                "sha256": hashlib.sha256(self.text.encode()).hexdigest()}


def resolve_prompt(override: str | None, default: str, chat_template: str | None) -> PromptTemplate:
    if override is not None:
        return PromptTemplate("override", override)
    if chat_template:
        return PromptTemplate("native", chat_template)
    return PromptTemplate("built-in", default)


def find_chat_template(path: str, tokenizer: Any, revision: str | None = None) -> str | None:
    """The checkpoint's chat template: the processor's file beside the weights (``chat_template.jinja``, or
    ``chat_template.json``'s ``chat_template``), else the tokenizer's (its ``default`` where it has several)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        f = _checkpoint_file(path, name, revision)
        if f is None:
            continue
        text = Path(f).read_text()
        text = json.loads(text).get("chat_template") if name.endswith(".json") else text
        if text:
            return text
    tmpl = getattr(tokenizer, "chat_template", None)
    return tmpl.get("default") if isinstance(tmpl, dict) else tmpl


def _checkpoint_file(path: str, name: str, revision: str | None) -> str | None:
    if Path(path).is_dir():
        f = Path(path) / name
        return str(f) if f.is_file() else None
    from transformers.utils import cached_file

    return cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def messages(sample: Sample) -> list[dict]:
    """The sample's turns as transformers' chat messages (content as typed parts)."""
    out = []
    for turn in sample.turns:
        parts = [{"type": p.kind} if isinstance(p, Media) else {"type": "text", "text": p} for p in turn.content]
        out.append({"role": turn.role, "content": parts})
    return out


def render(tok, chat_template: str, sample: Sample, add_generation_prompt: bool) -> str:
    """The chat template's text for ``sample``, rendered as the processor renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    prompts, _ = render_jinja_template(conversations=[messages(sample)], chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt, **tok.special_tokens_map)
    return prompts[0]


def plan_native(adapter, loaded, sample: Sample) -> list:
    """``sample`` through the chat template as :meth:`Adapter._plan`'s pieces: ``(token ids, is_answer)``
    and the :class:`Media` to expand, in rendered order."""
    tok = loaded.tokenizer
    ends_with_answer = bool(sample.turns) and sample.turns[-1].role == "assistant"
    text = _rendered(adapter, loaded, sample, add_generation_prompt=not ends_with_answer)
    answers = _answer_spans(adapter, loaded, sample, text)
    media = _media_spans(adapter, loaded, sample, text)
    add_special = not (tok.bos_token is not None and text.startswith(tok.bos_token))
    enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
    plan: list = []
    m = 0
    for tid, (a, b) in zip(enc.input_ids, enc.offset_mapping):
        if m < len(media) and b > media[m][0]:  # a token of the next placeholder
            assert a >= media[m][0] and b <= media[m][1], f"token {tid} crosses a media placeholder"
            if b == media[m][1]:
                plan.append(media[m][2])
                m += 1
            continue
        is_answer = b > a and any(a < e and b > s for s, e in answers)  # tokens the tokenizer added have no span
        if plan and not isinstance(plan[-1], Media) and plan[-1][1] == is_answer:
            plan[-1][0].append(tid)
        else:
            plan.append(([tid], is_answer))
    assert m == len(media), f"{len(media) - m} media placeholder(s) not found in the tokens"
    return plan


def _media_spans(adapter, loaded, sample: Sample, text: str) -> list[tuple[int, int, Media]]:
    """(start, end, Media) of each placeholder in ``text``: the k-th of a kind is that kind's k-th part."""
    spans = []
    for kind in ("image", "video"):
        parts = [p for t in sample.turns for p in t.content if isinstance(p, Media) and p.kind == kind]
        if not parts:
            continue
        ph = adapter.chat_placeholder(loaded, kind)
        at = 0
        for p in parts:
            i = text.find(ph, at)
            if i < 0:
                raise ValueError(f"the chat template wrote fewer {kind} placeholders ({ph!r}) than the sample "
                                 f"has {kind}s ({len(parts)})")
            spans.append((i, i + len(ph), p))
            at = i + len(ph)
        if text.find(ph, at) >= 0:
            raise ValueError(f"the chat template wrote more {kind} placeholders ({ph!r}) than the sample has")
    return sorted(spans, key=lambda s: s[0])


def _rendered(adapter, loaded, sample: Sample, add_generation_prompt: bool) -> str:
    """The chat template's text with the text the processor writes around each media block put in."""
    text = render(loaded.tokenizer, loaded.prompt.text, sample, add_generation_prompt)
    for kind in sorted({p.kind for t in sample.turns for p in t.content if isinstance(p, Media)}):
        before, after = adapter.media_text(loaded, kind)
        if before or after:
            ph = adapter.chat_placeholder(loaded, kind)
            text = text.replace(ph, before + ph + after)
    return text


def stop_tokens(loaded) -> list[str]:
    """The text of the end-of-turn tokens that close an answer: the tokenizer's EOS and the checkpoint's
    generation stop ids (``generation_config.eos_token_id``: Gemma 3's ``<end_of_turn>`` besides ``<eos>``)."""
    tok = loaded.tokenizer
    ids = [tok.eos_token_id]
    gen = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, (list, tuple)) else [gen]
    texts = (tok.decode([i]) for i in dict.fromkeys(i for i in ids if i is not None))
    return [t for t in texts if t]


def _answer_spans(adapter, loaded, sample: Sample, text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn's text in ``text`` and the stop token right after it."""
    spans: list[tuple[int, int]] = []
    stops = stop_tokens(loaded)
    for i, turn in enumerate(sample.turns):
        if turn.role != "assistant" or not turn.text.strip():
            continue
        at = spans[-1][1] if spans else 0
        head = Sample(sample.turns[:i], sample.images, sample.videos)
        # the turn starts after the turns before it, as the generation prompt opens it where the template
        # writes the turn's head that way, else as they render alone (LLaVA-OneVision's "assistant \n" vs "\n")
        for gen in (True, False):
            prefix = _rendered(adapter, loaded, head, gen) if i else ""
            if text.startswith(prefix):
                at = max(at, len(prefix))
                break
        answer = turn.text.strip()
        start = text.find(answer, at)
        if start < 0:
            raise ValueError(f"the chat template did not write assistant turn {i}'s text")
        end = start + len(answer)
        end += next((len(s) for s in stops if text.startswith(s, end)), 0)
        spans.append((start, end))
    return spans
