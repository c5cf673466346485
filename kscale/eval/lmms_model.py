"""kscale's models as an lmms-eval model: the benchmarks everyone runs, on kscale's loading and adapters.

:class:`KscaleLMM` subclasses ``lmms_eval.api.model.lmms`` (lmms-eval 0.7.3, the "simple" model
interface) and answers the three request types the harness sends. Each request's ``args`` are, as
``lmms_eval.api.task.Task.construct_requests`` builds them:

- ``loglikelihood``: ``(context, continuation, doc_to_visual, doc_id, task, split)`` -- the
  ``multiple_choice`` and ``loglikelihood`` output types; ``continuation`` is a string (the choice with
  the task's ``target_delimiter``, " " by default) or a ``doc_to_target`` callable;
- ``generate_until``: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``;
- ``generate_until_multi_round``: ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task,
  split)``; round r > 0 asks ``doc_to_text(doc, previous_output=..., round_idx=r,
  previous_round_info=...)`` for ``(visuals, context, terminal, outputs, info)``.

``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the document's images (PIL; the evaluator
fills ``task_dict`` before it sends requests). A request becomes a :class:`kscale.models.inputs.Sample`
(one user turn: the images, then the context; for loglikelihood the continuation as the assistant turn)
and goes through the family adapter's :meth:`~kscale.models.registry.Adapter.batch`, the one path by which
every kscale stage feeds a model. The adapter renders an assistant turn as ``" " + text`` and the end
token, so one leading space of the continuation is the delimiter kscale already puts there, and the end
token is not scored: the score is that of the continuation's tokens only, ``is_greedy`` whether each of
them is the argmax (:func:`kscale.scoring.answer_scores`).

Two facts of lmms-eval 0.7.3 that the docstring of ``lmms.loglikelihood`` does not say (read in its
source, ``api/task.py`` and ``evaluator.py``):

- ``multiple_choice`` picks ``argmin`` of the returned numbers ("we return the actual loss"), and its own
  Hugging Face models return the mean cross-entropy of the continuation. :meth:`KscaleLMM.loglikelihood`
  does the same: the first number is the mean negative log-likelihood per continuation token (lower is
  better), so the harness's choice is the argmax of the mean log-likelihood;
- the evaluator passes every response through ``unwrap_generation_output``, which turns a plain
  ``(float, bool)`` into its ``str``, and multiple-choice scoring then fails (``too many values to
  unpack``). Each pair is returned inside a ``GenerationResult`` (whose ``text`` is unwrapped as is), so
  the task sees the tuple.

``blind=True`` drops every image before rendering: the same question without its image, the blind
baseline as MMStar defines it. The model variant (base, a MaLoRA adapter gated or merged, a PEFT LoRA) is
applied to the loaded model beforehand by :func:`kscale.eval.variants.load_variant`.

Videos and audio are not supported (a visual that is not a PIL image raises).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from kscale.models import LoadedModel
from kscale.models.inputs import Media, Sample, Turn
from kscale.scoring import answer_positions, answer_scores


class KscaleLMM(lmms):
    """An lmms-eval model over a :class:`~kscale.models.LoadedModel` (with its adapter, if any, applied)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 4, blind: bool = False, max_new_tokens: int = 32):
        super().__init__()
        self.loaded = loaded
        self.batch_size = int(batch_size)
        self.blind = bool(blind)
        self.max_new_tokens = int(max_new_tokens)
        self.seen: set[tuple[str, int]] = set()  # (task, doc_id) of every request answered here (this rank's shard)

    @property
    def device(self) -> torch.device:
        """Where the model is: lmms-eval puts its per-rank request counts there to gather them across ranks."""
        return torch.device(self.loaded.device)

    # ------------------------------------------------------------------ requests -> samples

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        self.seen.add((task, int(doc_id)))
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, doc: Any) -> list:
        """The document's images (none when blind)."""
        if self.blind or doc_to_visual is None:
            return []
        visuals = doc_to_visual(doc) or []
        flat = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]
        for v in flat:
            if not hasattr(v, "convert"):
                raise TypeError(f"KscaleLMM takes images (PIL) only, got {type(v).__name__}")
        return [v.convert("RGB") for v in flat]

    @staticmethod
    def sample(images: list, context: str, answer: str | None = None) -> Sample:
        """One user turn (the images, then the context) and, given one, the answer as the assistant turn."""
        user = Turn("user", tuple(Media("image", k) for k in range(len(images))) + (context,))
        turns = (user,) if answer is None else (user, Turn("assistant", (answer,)))
        return Sample(turns, list(images))

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood per continuation token, is greedy) of each request, each inside a
        ``GenerationResult`` (see the module docstring)."""
        samples = []
        for context, continuation, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            continuation = str(continuation)
            answer = continuation[1:] if continuation.startswith(" ") else continuation
            samples.append(self.sample(self._visuals(doc_to_visual, doc), context, answer))
        out: list[GenerationResult] = []
        for a in range(0, len(samples), self.batch_size):
            out += [GenerationResult(text=(-ll_sum / n, greedy))  # type: ignore[arg-type]
                    for ll_sum, n, greedy in self.score_samples(samples[a:a + self.batch_size])]
        return out

    def score_samples(self, samples: list[Sample]) -> list[tuple[float, int, bool]]:
        """(sum of log p over the answer's tokens, their number, every token the argmax) of each sample's
        assistant turn, end token left out."""
        lm = self.loaded
        batch = lm.adapter.batch(lm, samples)
        mask_BT = continuation_mask(batch.answer_mask_BT, batch.inputs["input_ids"], lm.tokenizer.eos_token_id)
        keep_K = answer_positions(mask_BT)
        dev = {k: v.to(lm.device) for k, v in batch.inputs.items()}
        with torch.inference_mode():
            logits_BKV = lm.model(**dev, logits_to_keep=keep_K.to(lm.device), use_cache=False).logits
        s = answer_scores(logits_BKV.cpu(), batch.inputs["input_ids"], mask_BT, keep_K)
        return [(float(ll), int(n), bool(g)) for ll, n, g in zip(s.ll_sum, s.n_tokens, s.exact)]

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(task, split, doc_id)
            out.append(self.generate(self._visuals(doc_to_visual, doc), context, gen_kwargs or {}))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(task, split, doc_id)
            images, outputs, info, round_idx = self._visuals(doc_to_visual, doc), [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info)
                    outputs = list(outputs)
                    if terminal:
                        break
                    images = self._visuals(lambda _d: visuals, doc)
                outputs.append(self.generate(images, context, gen_kwargs or {}))
                round_idx += 1
            out.append(outputs)
        return out

    def generate(self, images: list, context: str, gen_kwargs: dict) -> str:
        """Greedy decoding of one prompt, cut at the first of ``gen_kwargs["until"]``."""
        lm = self.loaded
        batch = lm.adapter.batch(lm, [self.sample(images, context)], with_answers=False)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        dev = {k: v.to(lm.device) for k, v in batch.inputs.items()}
        n_prompt = dev["input_ids"].shape[1]
        with torch.inference_mode():
            ids = lm.model.generate(**dev, max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
                                    if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id)
        text = lm.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
        return cut_at(text, until)


def continuation_mask(answer_mask_BT: torch.Tensor, input_ids_BT: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """The answer span without its closing end token (the adapter appends one to every assistant turn)."""
    mask = answer_mask_BT.clone()
    if eos_id is None:
        return mask
    for b in range(mask.shape[0]):
        pos = torch.nonzero(mask[b]).squeeze(-1)
        if len(pos) > 1 and int(input_ids_BT[b, pos[-1]]) == eos_id:
            mask[b, pos[-1]] = False
    return mask


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
