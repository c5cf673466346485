"""The ``analyze:`` section of a job spec (``kind: analyze``).

The generic loader (:func:`kscale.spec.load_spec`, checks in :mod:`kscale.spec.fields`) builds :class:`AnalyzeConfig` from the YAML mapping, rejects
unknown keys, checks the choices (``Literal``) and bounds declared on each field, and calls
:meth:`AnalyzeConfig.validate` for the cross-field rules; every problem is a ``(dotted field, message)``
pair. Every field carries a one-line ``doc`` that feeds ``kscale validate --explain`` and docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kscale.spec.fields import doc


def store_problems(stores: list[str], vector: str = "k") -> list[str]:
    """Why each listed input store cannot be read (missing, or not a kscale key store), checked at
    validation so ``kscale validate`` reports it with every other problem instead of a StoreError later.

    A missing store is reported only when its parent folder is visible here: a job rendered for a cluster
    names stores on the cluster's filesystem (``/shared/...``), which this machine may not mount."""
    from kscale.store.layout import is_store, read_root_attrs, store_vectors

    out = []
    for i, s in enumerate(stores):
        p = Path(s).expanduser()
        if not p.exists():
            if p.absolute().parent.is_dir():
                out.append(f"[{i}] {s!r} does not exist")
        elif not is_store(p):
            out.append(f"[{i}] {s!r} is not a kscale key store (no kscale-keys root attributes)")
        elif vector not in store_vectors(read_root_attrs(p)):
            out.append(f"[{i}] {s!r} holds no {vector} vectors (it holds {', '.join(store_vectors(read_root_attrs(p)))}"
                       f"; extract with extract.vectors including {vector}), which analyze.vector asks for")
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class MMDConfig:
    n_features: int = doc("random Fourier frequencies D (feature dim is 2D: cos and sin)", 4096, ge=1)
    orthogonal: bool = doc("orthogonal random features (blocks of a random rotation); else i.i.d.", True)
    kernels: list[Literal["rbf", "laplacian", "linear"]] = doc(
        "kernels: rbf exp(-|x-y|^2/2s^2), laplacian exp(-|x-y|/s), linear x.y",
        factory=lambda: ["rbf", "laplacian", "linear"])
    normalisations: list[Literal["none", "l2", "standardize"]] = doc(
        "key transforms, each a separate ablation: none, l2 (unit norm), standardize",
        factory=lambda: ["none", "l2", "standardize"])
    bandwidth_multiples: list[float] = doc(
        "multiples of the median-heuristic bandwidth (one matrix product serves all)",
        factory=lambda: [0.5, 1.0, 2.0], gt=0)
    median_subsample: int = doc("tokens per modality for the median heuristic and standardisation", 2000, ge=10)
    estimator: Literal["block", "token"] = doc(
        "block: U-statistic leaving out every pair of tokens within one sample (tokens of a sample are "
        "dependent); token: leaves out only i = j (biased under within-sample dependence)", "block")
    bandwidth_policy: Literal["per_target", "per_layer", "fixed", "reference"] = doc(
        "where the median bandwidth and standardisation come from: per_target (each head, and heads pooled), "
        "per_layer (all selected heads pooled, shared by the layer's rows), fixed (mmd.bandwidths), reference "
        "(per layer from mmd.reference_store's pool, shared by every store)", "per_target")
    bandwidths: dict[str, float] = doc(
        "bandwidth per normalisation for bandwidth_policy fixed, e.g. {none: 3.0, l2: 1.1}", factory=dict)
    reference_store: str | None = doc(
        "store whose pools set bandwidths for policy reference (default: the first)", None)
    backend: Literal["auto", "numpy", "torch"] = doc(
        "random features in numpy, or torch (on the worker's GPU when it has one); auto: torch where CUDA is "
        "visible, else numpy", "auto")
    compute_dtype: Literal["float32", "float64"] = doc(
        "dtype of cos/sin; projections and sums are always float64", "float32")
    batch_rows: int = doc("rows per feature batch inside a chunk (bounds the N x D temporaries)", 2048)
    max_accumulator_mb: int = doc("heads are processed in groups whose feature sums fit this budget", 256)


@dataclass(frozen=True, kw_only=True, slots=True)
class JSDConfig:
    units: Literal["nats", "bits"] = doc("units of every JSD value", "nats")
    histogram: list[Literal["marginal", "random", "pca", "lda"]] = doc(
        "histogram JSDs: per-dimension marginals, random/PCA/LDA 1-d slices",
        factory=lambda: ["marginal", "random", "pca", "lda"])
    bins: int = doc("shared quantile bins per dimension or slice", 32, ge=2)
    n_random: int = doc("random unit directions for sliced histograms", 16)
    n_pca: int = doc("leading principal directions for sliced histograms", 8)
    classifiers: list[Literal["logistic", "mlp"]] = doc(
        "classifier lower bounds: log 2 - held-out balanced log-loss", factory=lambda: ["logistic", "mlp"])
    mlp_hidden: int = doc("hidden width of the MLP probe", 128)
    epochs: int = doc("passes over the training buckets", 3)
    min_steps: int = doc("minimum Adam steps per epoch (small runs)", 300)
    max_passes: int = doc("cap on passes over a chunk's training tokens per epoch (bounds min_steps on tiny "
                          "stores)", 20, ge=1)
    batch_size: int = doc("minibatch size per modality", 512)
    lr: float = doc("Adam learning rate", 2e-3)
    max_train_tokens: int = doc("cap on training tokens per modality and epoch (streamed)", 200_000)
    heldout_fraction: float = doc("fraction of sample buckets held out to score the classifiers", 0.25,
                                   gt=0, lt=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignificanceConfig:
    n_buckets: int = doc("samples are hashed into this many groups: clusters for SEs, halves, folds", 32, ge=4)
    alpha: float = doc("test level, and 1 - interval coverage", 0.05, gt=0, lt=1)
    permutations: int = doc("sequence-level permutations (0: off); primary kernel only", 1000)
    max_permutation_units: int = doc(
        "skip permutations when more (sample, modality) sequences than this; rows keep the cross-MMD p", 4096)


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedConfig:
    methods: list[Literal["pca", "tsne"]] = doc("pictures: pca, tsne (openTSNE)", factory=lambda: ["pca", "tsne"])
    layers: Literal["all"] | list[int] = doc("layers to picture; empty: first, middle and last", factory=list)
    subsample: int = doc("tokens per modality in each picture", 1500)
    perplexity: float = doc("t-SNE perplexity", 30.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class PaperConfig:
    enabled: bool = doc("add the paper-compatible exact MMD rows", True)
    estimator: Literal["biased", "unbiased"] = doc("V-statistic (biased, >= 0) or U-statistic", "biased")
    bandwidth_rule: Literal["median", "median_sq", "mean_sq"] = doc(
        "median: s = med|x-y|; median_sq: 2s^2 = med|x-y|^2; mean_sq: 2s^2 = mean|x-y|^2", "median")
    multiples: list[float] = doc("RBF bandwidth multiples summed into one kernel", factory=lambda: [1.0])


@dataclass(frozen=True, kw_only=True, slots=True)
class DaskConfig:
    scheduler: Literal["threads", "distributed", "sync"] = doc(
        "threads (in process), distributed (a dask cluster), sync (debug)", "threads")
    address: str | None = doc("scheduler address of a running cluster", None)
    scheduler_file: str | None = doc("scheduler file of a running cluster", None)
    n_workers: int = doc("threads, or LocalCluster workers when no address", 2)
    chunk_mb: int = doc("target size of one streamed chunk of keys", 32)


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalyzeConfig:
    stores: list[str] = doc("key store paths (one result set each)", factory=list)
    layers: Literal["all"] | list[int] = doc("model layers to analyse", "all")
    vector: Literal["k", "q", "v"] = doc(
        "which stored vectors to compare: k (keys), q (queries) or v (values); the store must hold them "
        "(extract.vectors)", "k")
    heads: Literal["all"] | list[int] = doc("KV heads analysed one by one (query heads with vector: q); heads "
                                            "pooled is always added", "all")
    pooled: bool = doc("add rows for all selected heads pooled (head = -1)", True)
    image_modality: Literal["image", "video"] = doc("the visual side: image or video", "image")
    comparisons: list[Literal["cross", "intra_text", "intra_image"]] = doc(
        "cross (image vs text); intra_* (two halves of the samples, same modality)",
        factory=lambda: ["cross", "intra_text", "intra_image"])
    estimators: list[Literal["mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf"]] = doc(
        "what to compute: mmd_rf, mmd_exact (+paper mode), jsd_hist, jsd_clf",
        factory=lambda: ["mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf"])
    exact_subsample: int = doc("tokens per side for exact (blocked) and paper-mode MMD", 2000, ge=4)
    mmd: MMDConfig = doc("random-feature MMD options", factory=MMDConfig)
    jsd: JSDConfig = doc("Jensen-Shannon options", factory=JSDConfig)
    significance: SignificanceConfig = doc("p-values and intervals", factory=SignificanceConfig)
    embed: EmbedConfig = doc("t-SNE / PCA pictures", factory=EmbedConfig)
    paper_mode: PaperConfig = doc("published conventions", factory=PaperConfig)
    dask: DaskConfig = doc("where the streaming runs", factory=DaskConfig)
    seed: int = doc("seeds every random choice: frequencies, subsamples, bandwidth pools, buckets, head shuffles, "
                    "histogram directions, probes and t-SNE (recorded in meta.json and rows)", 0)

    def validate(self) -> list[tuple[str, str]]:
        """Cross-field rules; choices and bounds are declared on the fields (checked by the loader)."""
        problems: list[tuple[str, str]] = []
        if not self.stores:
            problems.append(("stores", "at least one key store path is needed"))
        if self.mmd.bandwidth_policy == "fixed":
            for how in self.mmd.normalisations:
                if not self.mmd.bandwidths.get(how, 0) > 0:
                    problems.append((f"mmd.bandwidths.{how}", "bandwidth_policy fixed needs a bandwidth > 0 "
                                                               "for every normalisation"))
        problems += [("stores", m) for m in store_problems(self.stores, self.vector)]
        if self.dask.scheduler == "distributed" and self.dask.address and self.dask.scheduler_file:
            problems.append(("dask.address", "give address or scheduler_file, not both"))
        return problems
