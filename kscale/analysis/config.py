"""The ``analyze:`` section of a job spec (``kind: analyze``).

The generic loader in ``kscale/spec.py`` builds :class:`AnalyzeConfig` from the YAML mapping, rejects
unknown keys and calls :meth:`AnalyzeConfig.validate`, which returns ``(dotted field, message)`` pairs.
Every field carries a one-line ``doc`` that feeds ``kscale validate --explain`` and docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kernel = Literal["rbf", "laplacian", "linear"]
Normalisation = Literal["none", "l2", "standardize"]
Comparison = Literal["cross", "intra_text", "intra_image"]
JSDKind = Literal["marginal", "random", "pca", "lda"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MMDConfig:
    n_features: int = field(
        default=4096, metadata={"doc": "random Fourier frequencies D (feature dim is 2D: cos and sin)"}
    )
    orthogonal: bool = field(
        default=True, metadata={"doc": "orthogonal random features (blocks of a random rotation); else i.i.d."}
    )
    kernels: list[str] = field(
        default_factory=lambda: ["rbf", "laplacian", "linear"],
        metadata={"doc": "kernels: rbf exp(-|x-y|^2/2s^2), laplacian exp(-|x-y|/s), linear x.y"},
    )
    normalisations: list[str] = field(
        default_factory=lambda: ["none", "l2", "standardize"],
        metadata={"doc": "key transforms, each a separate ablation: none, l2 (unit norm), standardize"},
    )
    bandwidth_multiples: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        metadata={"doc": "multiples of the median-heuristic bandwidth (one matrix product serves all)"},
    )
    median_subsample: int = field(
        default=2000, metadata={"doc": "tokens per modality for the median heuristic and standardisation"}
    )
    estimator: Literal["block", "token"] = field(
        default="block",
        metadata={"doc": "block: U-statistic leaving out every pair of tokens within one sample (tokens of a "
                         "sample are dependent); token: leaves out only i = j (biased under within-sample "
                         "dependence)"},
    )
    bandwidth_policy: Literal["per_target", "per_layer", "fixed", "reference"] = field(
        default="per_target",
        metadata={"doc": "where the median bandwidth and standardisation come from: per_target (each head, and "
                         "heads pooled), per_layer (all selected heads pooled, shared by the layer's rows), "
                         "fixed (mmd.bandwidths), reference (per layer from mmd.reference_store's pool, shared "
                         "by every store)"},
    )
    bandwidths: dict[str, float] = field(
        default_factory=dict,
        metadata={"doc": "bandwidth per normalisation for bandwidth_policy fixed, e.g. {none: 3.0, l2: 1.1}"},
    )
    reference_store: str | None = field(
        default=None, metadata={"doc": "store whose pools set bandwidths for policy reference (default: the first)"}
    )
    backend: Literal["auto", "numpy", "torch"] = field(
        default="auto",
        metadata={"doc": "random features in numpy, or torch (on the worker's GPU when it has one); auto: "
                         "torch where CUDA is visible, else numpy"},
    )
    compute_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"doc": "dtype of cos/sin; projections and sums are always float64"}
    )
    batch_rows: int = field(
        default=2048, metadata={"doc": "rows per feature batch inside a chunk (bounds the N x D temporaries)"}
    )
    max_accumulator_mb: int = field(
        default=256, metadata={"doc": "heads are processed in groups whose feature sums fit this budget"}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class JSDConfig:
    units: Literal["nats", "bits"] = field(default="nats", metadata={"doc": "units of every JSD value"})
    histogram: list[str] = field(
        default_factory=lambda: ["marginal", "random", "pca", "lda"],
        metadata={"doc": "histogram JSDs: per-dimension marginals, random/PCA/LDA 1-d slices"},
    )
    bins: int = field(default=32, metadata={"doc": "shared quantile bins per dimension or slice"})
    n_random: int = field(default=16, metadata={"doc": "random unit directions for sliced histograms"})
    n_pca: int = field(default=8, metadata={"doc": "leading principal directions for sliced histograms"})
    classifiers: list[str] = field(
        default_factory=lambda: ["logistic", "mlp"],
        metadata={"doc": "classifier lower bounds: log 2 - held-out balanced log-loss"},
    )
    mlp_hidden: int = field(default=128, metadata={"doc": "hidden width of the MLP probe"})
    epochs: int = field(default=3, metadata={"doc": "passes over the training buckets"})
    min_steps: int = field(default=300, metadata={"doc": "minimum Adam steps per epoch (small runs)"})
    max_passes: int = field(
        default=20, metadata={"doc": "cap on passes over a chunk's training tokens per epoch (bounds min_steps "
                                     "on tiny stores)"}
    )
    batch_size: int = field(default=512, metadata={"doc": "minibatch size per modality"})
    lr: float = field(default=2e-3, metadata={"doc": "Adam learning rate"})
    max_train_tokens: int = field(
        default=200_000, metadata={"doc": "cap on training tokens per modality and epoch (streamed)"}
    )
    heldout_fraction: float = field(
        default=0.25, metadata={"doc": "fraction of sample buckets held out to score the classifiers"}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SignificanceConfig:
    n_buckets: int = field(
        default=32,
        metadata={"doc": "samples are hashed into this many groups: clusters for SEs, halves, folds"},
    )
    alpha: float = field(default=0.05, metadata={"doc": "test level, and 1 - interval coverage"})
    permutations: int = field(
        default=1000, metadata={"doc": "sequence-level permutations (0: off); primary kernel only"}
    )
    max_permutation_units: int = field(
        default=4096, metadata={"doc": "skip permutations when more (sample, modality) sequences than this"}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedConfig:
    methods: list[str] = field(
        default_factory=lambda: ["pca", "tsne"], metadata={"doc": "pictures: pca, tsne (openTSNE)"}
    )
    layers: Literal["all"] | list[int] = field(
        default_factory=list, metadata={"doc": "layers to picture; empty: first, middle and last"}
    )
    subsample: int = field(default=1500, metadata={"doc": "tokens per modality in each picture"})
    perplexity: float = field(default=30.0, metadata={"doc": "t-SNE perplexity"})


@dataclass(frozen=True, kw_only=True, slots=True)
class PaperConfig:
    enabled: bool = field(default=True, metadata={"doc": "add the paper-compatible exact MMD rows"})
    estimator: Literal["biased", "unbiased"] = field(
        default="biased", metadata={"doc": "V-statistic (biased, >= 0) or U-statistic"}
    )
    bandwidth_rule: Literal["median", "median_sq", "mean_sq"] = field(
        default="median",
        metadata={"doc": "median: s = med|x-y|; median_sq: 2s^2 = med|x-y|^2; mean_sq: 2s^2 = mean|x-y|^2"},
    )
    multiples: list[float] = field(
        default_factory=lambda: [1.0], metadata={"doc": "RBF bandwidth multiples summed into one kernel"}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class DaskConfig:
    scheduler: Literal["threads", "distributed", "sync"] = field(
        default="threads", metadata={"doc": "threads (in process), distributed (a dask cluster), sync (debug)"}
    )
    address: str | None = field(default=None, metadata={"doc": "scheduler address of a running cluster"})
    scheduler_file: str | None = field(default=None, metadata={"doc": "scheduler file of a running cluster"})
    n_workers: int = field(default=2, metadata={"doc": "threads, or LocalCluster workers when no address"})
    chunk_mb: int = field(default=32, metadata={"doc": "target size of one streamed chunk of keys"})


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalyzeConfig:
    stores: list[str] = field(default_factory=list, metadata={"doc": "key store paths (one result set each)"})
    layers: Literal["all"] | list[int] = field(default="all", metadata={"doc": "model layers to analyse"})
    heads: Literal["all"] | list[int] = field(
        default="all", metadata={"doc": "KV heads analysed one by one; heads pooled is always added"}
    )
    pooled: bool = field(default=True, metadata={"doc": "add rows for all selected heads pooled (head = -1)"})
    image_modality: str = field(default="image", metadata={"doc": "the visual side: image or video"})
    comparisons: list[str] = field(
        default_factory=lambda: ["cross", "intra_text", "intra_image"],
        metadata={"doc": "cross (image vs text); intra_* (two halves of the samples, same modality)"},
    )
    estimators: list[str] = field(
        default_factory=lambda: ["mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf"],
        metadata={"doc": "what to compute: mmd_rf, mmd_exact (+paper mode), jsd_hist, jsd_clf"},
    )
    exact_subsample: int = field(
        default=2000, metadata={"doc": "tokens per side for exact (blocked) and paper-mode MMD"}
    )
    mmd: MMDConfig = field(default_factory=MMDConfig, metadata={"doc": "random-feature MMD options"})
    jsd: JSDConfig = field(default_factory=JSDConfig, metadata={"doc": "Jensen-Shannon options"})
    significance: SignificanceConfig = field(
        default_factory=SignificanceConfig, metadata={"doc": "p-values and intervals"}
    )
    embed: EmbedConfig = field(default_factory=EmbedConfig, metadata={"doc": "t-SNE / PCA pictures"})
    paper_mode: PaperConfig = field(default_factory=PaperConfig, metadata={"doc": "published conventions"})
    dask: DaskConfig = field(default_factory=DaskConfig, metadata={"doc": "where the streaming runs"})
    seed: int = field(
        default=0,
        metadata={"doc": "seeds every random choice: frequencies, subsamples, bandwidth pools, buckets, head "
                         "shuffles, histogram directions, probes and t-SNE (recorded in meta.json and rows)"},
    )

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []

        def bad_items(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
            for i, v in enumerate(values):
                if v not in allowed:
                    problems.append((f"{name}[{i}]", f"{v!r} is not one of {list(allowed)}"))

        bad_items("comparisons", self.comparisons, ("cross", "intra_text", "intra_image"))
        bad_items("estimators", self.estimators, ("mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf"))
        bad_items("mmd.kernels", self.mmd.kernels, ("rbf", "laplacian", "linear"))
        bad_items("mmd.normalisations", self.mmd.normalisations, ("none", "l2", "standardize"))
        bad_items("jsd.histogram", self.jsd.histogram, ("marginal", "random", "pca", "lda"))
        bad_items("jsd.classifiers", self.jsd.classifiers, ("logistic", "mlp"))
        bad_items("embed.methods", self.embed.methods, ("pca", "tsne"))
        if self.image_modality not in ("image", "video"):
            problems.append(("image_modality", f"{self.image_modality!r} is not one of ['image', 'video']"))
        if not self.stores:
            problems.append(("stores", "at least one key store path is needed"))
        for name, value, low in [
            ("mmd.n_features", self.mmd.n_features, 1),
            ("mmd.median_subsample", self.mmd.median_subsample, 10),
            ("exact_subsample", self.exact_subsample, 4),
            ("significance.n_buckets", self.significance.n_buckets, 4),
            ("jsd.bins", self.jsd.bins, 2),
        ]:
            if value < low:
                problems.append((name, f"{value} is below the minimum {low}"))
        if self.mmd.bandwidth_policy == "fixed":
            for how in self.mmd.normalisations:
                if not self.mmd.bandwidths.get(how, 0) > 0:
                    problems.append((f"mmd.bandwidths.{how}", "bandwidth_policy fixed needs a bandwidth > 0 "
                                                               "for every normalisation"))
        if any(m <= 0 for m in self.mmd.bandwidth_multiples):
            problems.append(("mmd.bandwidth_multiples", f"{self.mmd.bandwidth_multiples} must be > 0"))
        if not 0 < self.significance.alpha < 1:
            problems.append(("significance.alpha", f"{self.significance.alpha} must be in (0, 1)"))
        if not 0 < self.jsd.heldout_fraction < 1:
            problems.append(("jsd.heldout_fraction", f"{self.jsd.heldout_fraction} must be in (0, 1)"))
        if self.dask.scheduler == "distributed" and self.dask.address and self.dask.scheduler_file:
            problems.append(("dask.address", "give address or scheduler_file, not both"))
        return problems
