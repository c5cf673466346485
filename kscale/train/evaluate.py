"""Before/after evaluation of a MaLoRA run on its held-out records: one command, one table.

``python -m kscale.train.evaluate job.yaml`` (or ``run_train`` at the end of training, rank 0) loads the
base model, injects the run's saved adapter, and evaluates three variants on the same held-out
(image, question, answer) records, listed in ``split.json`` of the run directory:

- ``base``: both branches off (exactly the base model, B of the text branch aside: see merge);
- ``malora``: the trained adapter;
- ``malora_no_image_branch``: the partial-modality ablation (image branch off).

Rows of the table (``eval.json``, ``eval.md``):

- ``key_mmd2_layer{l}``: exact MMD^2 (``kscale.analysis.mmd.exact_mmd2``, RBF kernel) between image and
  text keys (k_proj output, pre-RoPE) at each alignment layer, averaged over KV heads, each head with
  the median-distance bandwidth of that variant's own pooled keys (as the analysis stage would measure
  each model; a bandwidth fixed from the base model would also count a mere rescaling of all keys), with
  ``key_mmd2_ci_low_layer{l}`` / ``key_mmd2_ci_high_layer{l}``: a 95% t interval from the head-averaged witness clustered by
  held-out sample (samples are the independent units);
- ``lm_loss``: answer-token cross-entropy with the real image;
- ``ll_real`` / ``ll_blank`` / ``ll_swapped``: mean per-token log-likelihood of the answer with the real
  image, a blank grey image of the same size, and another held-out sample's image (its donor in a
  derangement of the held-out records seeded by ``train.seed``, resized to this sample's size);
- ``acc_real`` / ``acc_blank`` / ``acc_swapped``: teacher-forced exact match of the whole answer;
- ``visual_dependency`` = ll_real - ll_blank and ``swap_sensitivity`` = ll_real - ll_swapped (text bias
  shows as values near 0: the answer does not depend on the image);
- ``attn_mass_image`` / ``attn_efficiency_image``: how much the answer tokens attend to image keys, and
  that mass over the image tokens' share of the visible keys (``kscale.attention.stats``; 1 means
  attention in proportion to presence), averaged over the alignment layers' query heads and samples.

The image conditions and the answer scores are the bias stage's too (:mod:`kscale.scoring`), so this table
and a bias job measure visual dependency the same way.

Legend: B batch, T tokens, K kept logit positions, V vocab, N image keys, M text keys, H KV heads, D head dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kscale.data.records import RecordList
from kscale.models import LoadedModel
from kscale.models.registry import IMAGE, TEXT, VIDEO, resolve_layers
from kscale.scoring import answer_positions, answer_scores, condition_image, swap_donor
from kscale.spec import JobSpec
from kscale.train.layout import ADAPTER_DIR, SPLIT
from kscale.train.lora import load_trained
from kscale.adapters import MaLoRAModel
from kscale.adapters.model import model_adapter
from kscale.train.objective import capture_keys

VARIANTS = ("base", "malora", "malora_no_image_branch")
CONDITIONS = ("real", "blank", "swapped")
BLANK_RGB = [128, 128, 128]
MAX_KEYS = 2000  # keys per side and layer kept for the exact MMD


@dataclass
class _Acc:
    """Running per-sample answer scores and pooled keys for one variant."""

    ll: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CONDITIONS})
    acc: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CONDITIONS})
    ce_sum: float = 0.0
    ce_count: int = 0
    attn_mass: list[np.ndarray] = field(default_factory=list)
    attn_efficiency: list[np.ndarray] = field(default_factory=list)
    img_keys: dict[int, list[np.ndarray]] = field(default_factory=dict)
    txt_keys: dict[int, list[np.ndarray]] = field(default_factory=dict)
    img_sid: list[np.ndarray] = field(default_factory=list)  # held-out sample index of each kept key row
    txt_sid: list[np.ndarray] = field(default_factory=list)


def evaluate_run(spec: JobSpec, adapter_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate ``spec``'s run directory; writes eval.json and eval.md there and returns the table."""
    from kscale.data import open_source
    from kscale.models.registry import load_model
    from kscale.train.data import split_indices

    run_dir = Path(spec.output.path)
    cfg = spec.train
    loaded = load_model(spec.model)
    malora = load_trained(loaded.model, adapter_dir or run_dir / ADAPTER_DIR)
    source = open_source(spec.data)
    split_file = run_dir / SPLIT
    if split_file.exists():
        heldout = json.loads(split_file.read_text())["heldout"]
    else:
        heldout = split_indices(len(source), cfg.eval.heldout_fraction, cfg.eval.max_samples, cfg.seed).heldout
    records = [r for r in (source.get(i) for i in heldout) if r.error is None and r.answer and r.image is not None]
    layers = resolve_layers(cfg.align.layers, loaded.info.num_layers, "align.layers")
    table = evaluate(loaded, malora, records, layers, cfg.eval.batch_size, seed=cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(table, indent=2) + "\n")
    (run_dir / "eval.md").write_text(markdown_table(table, n_samples=len(records)))
    return table


def evaluate(loaded: Any, malora: MaLoRAModel, records: list, layers: list[int],
             batch_size: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """The before/after table (variant -> metric -> value) on ``records`` (each with an image);
    ``malora`` wraps ``loaded.model``."""
    if len(records) < 2:
        raise ValueError(f"evaluation needs at least 2 held-out records with an image, got {len(records)}")
    malora.eval()
    variants = eval_variants(malora)
    accs = {v: _Acc() for v in variants}
    heldout = RecordList(records)  # swap donors are drawn among the held-out records only
    donors = [swap_donor(heldout, i, seed)[1] for i in range(len(records))]
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        for condition in CONDITIONS:
            images = [condition_image(r, condition, seed, BLANK_RGB, donors[start + i]) for i, r in enumerate(chunk)]
            batch = loaded.adapter.build_batch(loaded, images, [r.text for r in chunk], [r.answer for r in chunk])
            for variant in variants:
                with _variant(malora, variant):
                    _score(loaded, malora, batch, condition, layers, accs[variant])
    return _finish(accs, layers, malora.model.config.get_text_config().num_key_value_heads)


def eval_variants(wrapped: Any) -> tuple[str, ...]:
    """The table's rows: base, MaLoRA and its image-branch ablation; or base and LoRA (no branches to ablate)."""
    from kscale.train.lora import EVAL_VARIANTS, LoRAModel

    return EVAL_VARIANTS if isinstance(wrapped, LoRAModel) else VARIANTS


def _variant(malora: MaLoRAModel, variant: str):
    if variant == "base":
        return malora.branches(image=False, text=False)
    if variant == "malora_no_image_branch":
        return malora.branches(image=False, text=True)
    return malora.branches(image=True, text=True)


@torch.no_grad()
def _score(loaded: LoadedModel, malora: MaLoRAModel, batch: Any, condition: str, layers: list[int], acc: _Acc) -> None:
    device = next(malora.model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    answer_BT = batch.answer_mask_BT.to(device)
    keep_K = answer_positions(answer_BT)
    with capture_keys(malora, layers if condition == "real" else []) as keys, \
            _attention_capture(malora, layers if condition == "real" else []) as cap:
        logits_BKV = malora(**inputs, logits_to_keep=keep_K, use_cache=False).logits
    scores = answer_scores(logits_BKV, inputs["input_ids"], answer_BT, keep_K)
    acc.ll[condition].extend(scores.ll_mean.tolist())
    acc.acc[condition].extend(scores.exact.astype(float).tolist())
    if condition == "real":
        acc.ce_sum += float(-scores.ll_sum.sum())
        acc.ce_count += int(scores.n_tokens.sum())
        _attention_stats(loaded, batch, cap, layers, acc)
        modality_BT = batch.modality_BT.to(device)
        image_BT = (modality_BT == IMAGE) | (modality_BT == VIDEO)
        first = len(acc.ll["real"]) - image_BT.shape[0]  # held-out index of this batch's first sample
        acc.img_sid.append(first + image_BT.nonzero()[:, 0].cpu().numpy())
        acc.txt_sid.append(first + (modality_BT == TEXT).nonzero()[:, 0].cpu().numpy())
        for idx in layers:
            acc.img_keys.setdefault(idx, []).append(keys[idx][image_BT].float().cpu().numpy())
            acc.txt_keys.setdefault(idx, []).append(keys[idx][modality_BT == TEXT].float().cpu().numpy())


def _attention_capture(malora: MaLoRAModel, layers: list[int]):
    """q/k projection outputs and RoPE positions of ``layers`` (kscale.extract.hooks), for the attention stats."""
    from kscale.extract.hooks import capture

    adapter = model_adapter(malora.model)
    q_mods, k_mods = adapter.query_modules(malora.model), adapter.key_modules(malora.model)
    modules = {(kind, i): mods[i] for i in layers for kind, mods in (("q", q_mods), ("k", k_mods))}
    rotary = adapter.rotary_module(malora.model) if layers else None
    return capture(modules, rotary)


def _attention_stats(loaded: LoadedModel, batch: Any, cap: Any, layers: list[int], acc: _Acc) -> None:
    """Answer tokens' attention to image keys, per (sample, layer, query head), from kscale.attention.

    ``loaded`` is the LoadedModel whose ``model`` the adapter was injected into (the attention modules and
    the rotary embedding are the base model's own)."""
    from kscale.attention.stats import batch_stats
    from kscale.spec import AttentionSpec

    kv_heads = list(range(loaded.info.num_kv_heads))
    rows = batch_stats(loaded, layers, kv_heads, batch, cap, AttentionSpec(queries="answer"),
                       list(range(batch.modality_BT.shape[0])))
    acc.attn_mass.append(rows["mass"][:, IMAGE])
    acc.attn_efficiency.append(rows["efficiency"][:, IMAGE])


def _finish(accs: dict[str, _Acc], layers: list[int], n_heads: int) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for variant, a in accs.items():
        row = {f"ll_{c}": float(np.mean(a.ll[c])) for c in a.ll}
        row.update({f"acc_{c}": float(np.mean(a.acc[c])) for c in a.acc})
        row["lm_loss"] = a.ce_sum / max(a.ce_count, 1)
        row["visual_dependency"] = row["ll_real"] - row["ll_blank"]
        row["swap_sensitivity"] = row["ll_real"] - row["ll_swapped"]
        row["attn_mass_image"] = float(np.nanmean(np.concatenate(a.attn_mass)))
        row["attn_efficiency_image"] = float(np.nanmean(np.concatenate(a.attn_efficiency)))
        sid_img, sid_txt = np.concatenate(a.img_sid), np.concatenate(a.txt_sid)
        for idx in layers:
            img, txt = np.concatenate(a.img_keys[idx]), np.concatenate(a.txt_keys[idx])
            value, lo, hi = key_gap_interval(img, txt, n_heads, sid_img, sid_txt)
            row[f"key_mmd2_layer{idx}"] = value
            row[f"key_mmd2_ci_low_layer{idx}"], row[f"key_mmd2_ci_high_layer{idx}"] = lo, hi
        table[variant] = row
    return table


def key_gap(img_NF: np.ndarray, txt_MF: np.ndarray, n_heads: int,
            bandwidth_H: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Exact RBF MMD^2 between image and text keys per KV head, averaged; returns (value, bandwidths)."""
    value, bandwidth_H, _ = _head_mmd(img_NF, txt_MF, n_heads, bandwidth_H)
    return value, bandwidth_H


def key_gap_interval(img_NF: np.ndarray, txt_MF: np.ndarray, n_heads: int, sid_img_N: np.ndarray,
                     sid_txt_M: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) of :func:`key_gap`: the head-averaged witness, clustered by sample
    (``kscale.analysis.stats.clustered_witness_se``), with a t interval over samples."""
    from kscale.analysis.stats import clustered_witness_se, t_interval

    value, _, (keep_img, keep_txt, wx_N, wy_M) = _head_mmd(img_NF, txt_MF, n_heads, None)
    se, groups = clustered_witness_se(wx_N, np.asarray(sid_img_N)[keep_img], wy_M, np.asarray(sid_txt_M)[keep_txt])
    lo, hi = t_interval(value, se, groups, alpha)
    return value, float(lo), float(hi)


def _head_mmd(img_NF: np.ndarray, txt_MF: np.ndarray, n_heads: int, bandwidth_H: np.ndarray | None):
    """Per-head exact MMD^2 on at most MAX_KEYS keys a side: (mean, bandwidths, (kept rows, mean witnesses))."""
    from kscale.analysis.mmd import exact_mmd2, median_bandwidth

    rng = np.random.default_rng(0)
    keep_img = rng.permutation(len(img_NF))[:MAX_KEYS]
    keep_txt = rng.permutation(len(txt_MF))[:MAX_KEYS]
    H = n_heads
    img_NHD = img_NF[keep_img].reshape(len(keep_img), H, -1)
    txt_MHD = txt_MF[keep_txt].reshape(len(keep_txt), H, -1)
    if bandwidth_H is None:
        bandwidth_H = np.array([median_bandwidth(np.concatenate([img_NHD[:, h], txt_MHD[:, h]])) for h in range(H)])
    res = [exact_mmd2(img_NHD[:, h], txt_MHD[:, h], [("rbf", float(bandwidth_H[h]))]) for h in range(H)]
    values = [r.value_k[0] for r in res]
    wx_N = np.mean([r.witness_x_kn[0] for r in res], axis=0)
    wy_M = np.mean([r.witness_y_km[0] for r in res], axis=0)
    return float(np.mean(values)), bandwidth_H, (keep_img, keep_txt, wx_N, wy_M)


def markdown_table(table: dict[str, dict[str, float]], n_samples: int) -> str:
    metrics = list(next(iter(table.values())))
    lines = [f"Held-out evaluation on {n_samples} samples", "",
             "| metric | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(f"{table[v][m]:.4f}" for v in table) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    from kscale.spec import load_spec

    if len(argv) != 1:
        raise SystemExit("usage: python -m kscale.train.evaluate JOB.yaml")
    spec = load_spec(argv[0])
    table = evaluate_run(spec)
    print(markdown_table(table, n_samples=-1).split("\n", 2)[2])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
