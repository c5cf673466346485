"""The unit of work of a bias job: a plain function of (spec, shard), no Ray in it.

``setup(spec)`` loads the base model once per worker; ``run_shard(spec, shard, state)`` switches the
model to the shard's variant (:class:`kscale.bias.variants.VariantSlot`), scores the shard's records and
writes ``shards/<name>.parquet``, then the ``.done.json`` marker (last). Executors (local, Ray) only
decide where this runs. Per record, one row of the per-sample table:

- per image condition c (``bias.conditions``): ``ll_c`` (mean per-token answer log-likelihood),
  ``ll_sum_c``, ``acc_c`` (teacher-forced exact match), ``greedy_c`` (argmax tokens, for agreement);
  with distractors ``choice_c`` / ``mc_acc_c``; with a contradicting text claim ``follows_image_c`` /
  ``follows_text_c``;
- dropping: ``ll_drop_<order>_<fraction>`` and the curve area ``auc_<order>`` (fraction 0 included);
- backbone: ``agree_blind`` (greedy answer with and without the image agree), ``mc_agree_blind``;
- ``ll_floor`` = -log V, the uniform-guess log-likelihood per token (for the blind share).

Legend: B rows, T tokens, K kept logit positions.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from kscale.bias.candidates import candidates, raw_row
from kscale.bias.dropping import attention_received, context_text_BT, drop_plan, dropped_inputs, full_positions
from kscale.bias.metrics import choose, conflict_outcome, curve_area
from kscale.bias.plan import BiasShard, marker_path, table_path
from kscale.bias.variants import VariantSlot
from kscale.data import Record, open_source
from kscale.models import LoadedModel, load_model, resolve_layers
from kscale.output import fence
from kscale.scoring import AnswerScores, answer_positions, answer_scores, condition_image, swap_donor
from kscale.spec import JobSpec
from kscale.store.layout import write_json_atomic


@dataclass
class BiasState:
    loaded: LoadedModel
    source: Any
    slot: VariantSlot
    rank_layers: list[int]
    tokens_scored: int = 0  # real tokens through the model, all forwards of the current shard

    def score(self, inputs: dict[str, torch.Tensor], answer_mask_BT: torch.Tensor) -> AnswerScores:
        self.tokens_scored += int(inputs["attention_mask"].sum())
        return score(self.loaded, inputs, answer_mask_BT)


def setup(spec: JobSpec) -> BiasState:
    if spec.resources.torch_threads:
        torch.set_num_threads(spec.resources.torch_threads)
    loaded = load_model(spec.model)
    rank_layers = resolve_layers(spec.bias.dropping.attention_layers, loaded.info.num_layers,
                                 "bias.dropping.attention_layers")
    from kscale.data.lineindex import index_dir

    return BiasState(loaded, open_source(spec.data, index_dir(spec.output.path)), VariantSlot(loaded), rank_layers)


def score(loaded: LoadedModel, inputs: dict[str, torch.Tensor], answer_mask_BT: torch.Tensor) -> AnswerScores:
    """One forward that keeps only the logits predicting answer tokens; the answer's scores per row."""
    keep_K = answer_positions(answer_mask_BT)
    dev = {k: v.to(loaded.device) for k, v in inputs.items()}
    with torch.inference_mode():
        logits_BKV = loaded.model(**dev, logits_to_keep=keep_K.to(loaded.device), use_cache=False).logits
    return answer_scores(logits_BKV.cpu(), inputs["input_ids"], answer_mask_BT, keep_K)


def _chunks(items: list, size: int):
    for a in range(0, len(items), size):
        yield items[a:a + size]


def _usable(spec: JobSpec, state: BiasState, shard: BiasShard) -> tuple[list[Record], list[dict]]:
    """Records that can be scored (image and answer present, short enough) and the errors of the others."""
    good, errors = [], []
    for i in range(shard.start, shard.stop):
        rec = state.source.get(i)
        reason = rec.error or (None if rec.image is not None else "no image (a bias job needs one per record)")
        reason = reason or (None if rec.answer else f"no answer (field {spec.data.answer_field!r})")
        (errors.append({"sample_id": i, "source_id": rec.source_id, "reason": reason}) if reason else good.append(rec))
    lm, kept = state.loaded, []
    for recs in _chunks(good, spec.bias.batch_size):
        b = lm.adapter.build_batch(lm, [r.image for r in recs], [r.text for r in recs], [r.answer for r in recs])
        for r, n in zip(recs, b.inputs["attention_mask"].sum(1).tolist()):
            if n > spec.bias.max_seq_len:
                errors.append({"sample_id": r.sample_id, "source_id": r.source_id,
                               "reason": f"sequence of {n} tokens is longer than bias.max_seq_len={spec.bias.max_seq_len}"})
            else:
                kept.append(r)
    return kept, sorted(errors, key=lambda e: e["sample_id"])


def _base_rows(spec: JobSpec, state: BiasState, shard: BiasShard, recs: list[Record], cands: dict) -> dict[int, dict]:
    v = shard.variant
    return {r.sample_id: {
        "sample_id": r.sample_id, "source_id": r.source_id, "task": str(r.meta.get("task", "")),
        "variant": v.name, "run": v.run, "step": v.step, "n_candidates": len(cands[r.sample_id].texts),
        "n_distractors": cands[r.sample_id].n_distractors, "has_claim": cands[r.sample_id].claim is not None,
    } for r in recs}


def score_conditions(spec: JobSpec, state: BiasState, recs: list[Record], cands: dict, rows: dict[int, dict]) -> None:
    """Every candidate of every record under every image condition; fills the condition columns of ``rows``."""
    cfg, lm = spec.bias, state.loaded
    donors = {r.sample_id: swap_donor(state.source, r.sample_id, cfg.seed) for r in recs} \
        if "swapped" in cfg.conditions else {}
    flat = [(r, k, text) for r in recs for k, text in enumerate(cands[r.sample_id].texts)]
    for cond in cfg.conditions:
        got: dict[tuple[int, int], tuple[float, float, bool, str, int]] = {}
        for chunk in _chunks(flat, cfg.batch_size):
            images = [condition_image(r, cond, cfg.seed, cfg.blank_rgb, donors.get(r.sample_id, (0, None))[1])
                      for r, _, _ in chunk]
            batch = lm.adapter.build_batch(lm, images, [r.text for r, _, _ in chunk], [t for _, _, t in chunk])
            s = state.score(batch.inputs, batch.answer_mask_BT)
            for j, (r, k, _) in enumerate(chunk):
                got[(r.sample_id, k)] = (s.ll_mean[j], s.ll_sum[j], bool(s.exact[j]), s.greedy[j],
                                         batch.n_image_tokens[j])
        for r in recs:
            row, c = rows[r.sample_id], cands[r.sample_id]
            ll, ll_sum, exact, greedy, n_img = got[(r.sample_id, 0)]
            row.update({f"ll_{cond}": ll, f"ll_sum_{cond}": ll_sum, f"acc_{cond}": float(exact),
                        f"greedy_{cond}": greedy})
            if cond == "real":
                row["n_image_tokens"] = n_img
            if cond == "swapped":
                row["swap_donor"] = donors[r.sample_id][0]
            per_cand = np.array([got[(r.sample_id, k)][0 if cfg.choice_score == "mean" else 1]
                                 for k in range(len(c.texts))])
            if c.n_distractors:
                pick = choose(per_cand[: c.n_distractors + 1])
                row[f"choice_{cond}"], row[f"mc_acc_{cond}"] = pick, float(pick == 0)
            if c.claim is not None:
                row[f"follows_image_{cond}"], row[f"follows_text_{cond}"] = conflict_outcome(
                    per_cand[0], per_cand[c.claim])


def score_dropping(spec: JobSpec, state: BiasState, recs: list[Record], rows: dict[int, dict]) -> None:
    """Answer log-likelihood (real image) as fractions of image / text context tokens are dropped."""
    cfg, lm = spec.bias, state.loaded
    dcfg = cfg.dropping
    fractions = [0.0] + list(dcfg.fractions)
    for chunk in _chunks(recs, cfg.batch_size):
        sids = [r.sample_id for r in chunk]
        batch = lm.adapter.build_batch(lm, [r.image for r in chunk], [r.text for r in chunk], [r.answer for r in chunk])
        pos = full_positions(lm, batch.inputs)
        received = None
        if {"least_attended", "most_attended"} & set(dcfg.orders):
            received = attention_received(lm, batch, state.rank_layers, dcfg.queries, dcfg.last_k)
            state.tokens_scored += int(batch.inputs["attention_mask"].sum())
        none_BT = torch.zeros_like(batch.answer_mask_BT)
        ll0 = state.score(dropped_inputs(lm, batch.inputs, none_BT, pos), batch.answer_mask_BT).ll_mean
        n_ctx = context_text_BT(batch.modality_BT, batch.answer_mask_BT).sum(1).tolist()
        for j, sid in enumerate(sids):
            rows[sid]["n_text_context"] = n_ctx[j]
        for order in dcfg.orders:
            curve_BF = np.empty((len(chunk), len(fractions)))
            curve_BF[:, 0] = ll0
            for f_i, frac in enumerate(dcfg.fractions, start=1):
                drop_BT = drop_plan(batch, order, frac, cfg.seed, sids, received)
                dropped = dropped_inputs(lm, batch.inputs, drop_BT, pos)
                curve_BF[:, f_i] = state.score(dropped, batch.answer_mask_BT).ll_mean
            for j, sid in enumerate(sids):
                for f_i, frac in enumerate(fractions):
                    rows[sid][f"ll_drop_{order}_{frac:.2f}"] = curve_BF[j, f_i]
                rows[sid][f"auc_{order}"] = curve_area(np.array(fractions), curve_BF[j])


def backbone_columns(spec: JobSpec, rows: dict[int, dict], floor: float) -> None:
    for row in rows.values():
        row["ll_floor"] = floor
        if "none" in spec.bias.conditions:
            row["agree_blind"] = float(row["greedy_real"] == row["greedy_none"])
            if "choice_real" in row:
                row["mc_agree_blind"] = float(row["choice_real"] == row["choice_none"])


def score_records(spec: JobSpec, state: BiasState, shard: BiasShard, recs: list[Record]) -> pd.DataFrame:
    """The per-sample table of ``recs`` for the variant already applied to ``state``."""
    cfg = spec.bias
    cands = {r.sample_id: candidates(r, raw_row(state.source, r.sample_id), cfg.distractor_field, cfg.claim_field)
             for r in recs}
    rows = _base_rows(spec, state, shard, recs, cands)
    if recs:
        score_conditions(spec, state, recs, cands, rows)
        if cfg.dropping.enabled:
            score_dropping(spec, state, recs, rows)
    vocab = state.loaded.model.get_output_embeddings().weight.shape[0]
    backbone_columns(spec, rows, -math.log(vocab))
    return pd.DataFrame([rows[r.sample_id] for r in recs])


def run_shard(spec: JobSpec, shard: BiasShard, state: BiasState) -> dict:
    """Score one (variant, sample range) shard into the run directory and commit it."""
    t0 = time.perf_counter()
    state.slot.apply(shard.variant)
    state.tokens_scored = 0
    recs, errors = _usable(spec, state, shard)
    table = score_records(spec, state, shard, recs)
    fence(spec.output.path)  # the run's lock is still ours (kscale.output.fence)
    out = table_path(spec.output.path, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    marker = {"shard": shard.name, "variant": shard.variant.name, "variant_fingerprint": shard.variant.fingerprint,
              "start": shard.start, "stop": shard.stop, "n_samples": shard.stop - shard.start,
              "n_samples_ok": len(recs), "n_errors": len(errors), "errors": errors,
              # executors report these: unmasked tokens of every forward, bytes of the shard's table
              "tokens": {"scored": state.tokens_scored}, "key_bytes": out.stat().st_size,
              "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(marker_path(spec.output.path, shard), marker)
    return marker
