"""Job specs: one YAML file in, one frozen ``JobSpec`` out.

Every section is a frozen dataclass whose fields carry a one-line ``doc`` in their metadata (that text
feeds ``kscale validate --explain`` and docs/spec.md). ``load_spec`` parses YAML with ``safe_load``
only, converts mappings into dataclasses by their type hints, rejects unknown keys and collects *every*
problem, each named by its dotted field and quoting the bad value, before raising one ``SpecError``.

Stage-specific sections (``analyze``, ``train``, ``bias``) live beside their stage and are imported
lazily through ``STAGE_SECTIONS`` so that a stage's dependencies load only when its kind is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

KINDS = ("extract", "analyze", "train", "bias")
MODALITIES = ("text", "image", "video", "special")


class SpecError(ValueError):
    """A job spec failed to load; ``problems`` lists ``(dotted_field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {f}: {m}" if f else f"  {m}" for f, m in problems]
        super().__init__("\n".join(lines))


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its one-line documentation."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# ----------------------------------------------------------------------------- common sections


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    path: str = doc("Local checkpoint directory, a hub id, or `debug:qwen2_5_vl` / `debug:llava` "
                    "(a tiny random model saved to a local directory and loaded like a real one).")
    architecture: Literal["auto", "qwen2_5_vl", "llava"] = doc(
        "Model family; `auto` reads `model_type` from the checkpoint's config.json.", "auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Weights dtype; `auto` is bfloat16 on CUDA and float32 on CPU.", "auto")
    device: Literal["auto", "cpu", "cuda"] = doc("Where the model runs; `auto` picks CUDA if visible.", "auto")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc(
        "Attention kernel. kscale hooks projections, so the fast kernel stays on.", "sdpa")
    trust_remote_code: bool = doc("Allow code shipped with the checkpoint to run. Off unless you trust it.", False)
    revision: str | None = doc("Hub revision (branch, tag or commit) when loading from the hub.", None)
    min_pixels: int | None = doc("Qwen2.5-VL image processor: fewest pixels per image (None: processor default).", None)
    max_pixels: int | None = doc("Qwen2.5-VL image processor: most pixels per image (None: processor default).", None)
    prompt_template: str | None = doc(
        "Prompt around the user text, with `{image}` where the image tokens go and `{text}` for the text. "
        "None: the family's chat format.", None)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.path:
            out.append(("path", "must be a directory, a hub id or debug:<family>"))
        elif self.path.startswith("debug:"):
            fam = self.path.split(":", 1)[1]
            if fam not in ("qwen2_5_vl", "llava"):
                out.append(("path", f"unknown debug model {fam!r} (choose debug:qwen2_5_vl or debug:llava)"))
        elif _looks_like_path(self.path) and not Path(self.path).expanduser().is_dir():
            out.append(("path", f"model directory {self.path!r} does not exist"))
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                out.append((name, f"must be positive, got {v}"))
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            out.append(("min_pixels", f"{self.min_pixels} is above max_pixels {self.max_pixels}"))
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            out.append(("prompt_template", "must contain {text}"))
        return out


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") != 1 or Path(s).expanduser().exists()


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratedDataSpec:
    n_samples: int = doc("How many synthetic samples to generate.", 64)
    image_size: int = doc("Side of the square synthetic images in pixels.", 56)
    seed: int = doc("Seed of the generator (same seed, same data).", 0)
    tasks: list[str] = doc("Question kinds: caption, color, shape, count, position, conflict.",
                           factory=lambda: ["caption", "color", "shape", "count", "position"])


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSpec:
    source: Literal["generated", "manifest", "hf_disk"] = doc(
        "`generated` (synthetic shapes), `manifest` (JSONL, image paths relative to it) or `hf_disk` "
        "(a Hugging Face dataset saved with save_to_disk).", "generated")
    path: str | None = doc("The manifest file or the saved dataset directory.", None)
    split: str | None = doc("Split of a saved DatasetDict (hf_disk).", None)
    image_field: str = doc("Record field holding the image (path for manifests, image for datasets).", "image")
    text_field: str = doc("Record field holding the text / prompt.", "text")
    answer_field: str | None = doc("Record field with the answer (training and bias jobs).", "answer")
    id_field: str | None = doc("Record field with a stable id (recorded in the store); None: the row number.", None)
    limit: int | None = doc("Use only the first N records.", None)
    shard_size: int = doc("Samples per shard: the unit of work, retry and resume.", 16)
    generated: GeneratedDataSpec = doc("Options of the generated source.", factory=GeneratedDataSpec)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.source in ("manifest", "hf_disk"):
            if not self.path:
                out.append(("path", f"required for source {self.source!r}"))
            elif not Path(self.path).expanduser().exists():
                out.append(("path", f"{self.path!r} does not exist"))
            elif self.source == "manifest" and not Path(self.path).is_file():
                out.append(("path", f"{self.path!r} is not a file"))
        if self.shard_size < 1:
            out.append(("shard_size", f"must be >= 1, got {self.shard_size}"))
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be >= 1, got {self.limit}"))
        if self.generated.n_samples < 1:
            out.append(("generated.n_samples", f"must be >= 1, got {self.generated.n_samples}"))
        if self.generated.image_size < 8:
            out.append(("generated.image_size", f"must be >= 8, got {self.generated.image_size}"))
        bad = sorted(set(self.generated.tasks) - {"caption", "color", "shape", "count", "position", "conflict"})
        if bad:
            out.append(("generated.tasks", f"unknown task(s) {bad}"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleTokens:
    text: Literal["all"] | int = doc("Text tokens kept per sample: all, or at most N chosen at random.", "all")
    image: Literal["all"] | int = doc("Image tokens kept per sample: all, or at most N.", "all")
    video: Literal["all"] | int = doc("Video tokens kept per sample: all, or at most N.", "all")
    special: Literal["all"] | int = doc("Special tokens kept per sample: all, or at most N.", "all")
    seed: int = doc("Seed of token sampling (mixed with each sample's id, so batches do not matter).", 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionSpec:
    enabled: bool = doc("Compute per-sample attention statistics during extraction.", False)
    queries: Literal["after_image", "last_k", "answer"] = doc(
        "Query tokens: text tokens after the first image, the last k tokens, or the answer span (`answer` "
        "appends each record's answer to its prompt, so answer tokens are stored as text keys too).", "after_image")
    last_k: int = doc("k for `queries: last_k`.", 8)
    query_chunk: int = doc("Queries processed at once (memory is O(T x chunk)).", 256)
    store_queries: bool = doc("Also store query vectors (same sampling and layout as keys).", False)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtractSpec:
    layers: Literal["all"] | list[int] = doc("Language-model layers to hook: all, or indices (negative count "
                                             "from the end).", "all")
    heads: Literal["all"] | list[int] = doc("KV heads to keep: all, or indices.", "all")
    sample_tokens: SampleTokens = doc("Per-modality token sampling per sample.", factory=SampleTokens)
    batch_size: int = doc("Samples per forward pass.", 4)
    max_seq_len: int = doc("Longest sequence accepted; longer samples are recorded as errors and skipped.", 4096)
    key_dtype: Literal["float16", "float32"] = doc("dtype of stored keys. Non-finite values are an error.", "float16")
    attention: AttentionSpec = doc("Attention statistics (see docs/attention.md).", factory=AttentionSpec)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        if self.max_seq_len < 8:
            out.append(("max_seq_len", f"must be >= 8, got {self.max_seq_len}"))
        for m in MODALITIES:
            v = getattr(self.sample_tokens, m)
            if isinstance(v, int) and v < 1:
                out.append((f"sample_tokens.{m}", f"must be 'all' or >= 1, got {v}"))
        if self.heads != "all" and len(set(self.heads)) != len(self.heads):
            out.append(("heads", f"duplicate indices in {self.heads}"))
        if self.layers != "all" and len(set(self.layers)) != len(self.layers):
            out.append(("layers", f"duplicate indices in {self.layers}"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputSpec:
    path: str = doc("Store (extract) or run directory (analyze, train, bias).")
    if_exists: Literal["resume", "fail", "overwrite"] = doc(
        "When the output exists: resume committed work, fail, or delete and start again.", "resume")
    chunk_tokens: int = doc("Tokens per Zarr chunk along the token axis.", 4096)
    compress_keys: bool = doc("Compress keys with zstd (fp16 keys shrink only ~8%; costs CPU).", False)

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.chunk_tokens >= 1 else [("chunk_tokens", f"must be >= 1, got {self.chunk_tokens}")]


@dataclass(frozen=True, kw_only=True, slots=True)
class ResourcesSpec:
    executor: Literal["ray", "local"] = doc("`ray`: a pool of Ray actors; `local`: in this process.", "ray")
    workers: int = doc("Number of workers (Ray actors), one per GPU on GPU machines.", 1)
    gpus_per_worker: float = doc("GPUs per worker (0 on CPU machines).", 0)
    cpus_per_worker: float = doc("CPUs per worker.", 1)
    max_retries: int = doc("Attempts per shard after the first before it is quarantined.", 2)
    torch_threads: int | None = doc("torch intra-op threads per worker (None: leave torch's default).", None)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.workers < 1:
            out.append(("workers", f"must be >= 1, got {self.workers}"))
        if self.gpus_per_worker < 0:
            out.append(("gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}"))
        if self.cpus_per_worker <= 0:
            out.append(("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}"))
        if self.max_retries < 0:
            out.append(("max_retries", f"must be >= 0, got {self.max_retries}"))
        return out


# Stage sections defined beside their stage, imported only when a job of that kind is loaded.
STAGE_SECTIONS: dict[str, str] = {
    "analyze": "kscale.analysis.config:AnalyzeConfig",
    "train": "kscale.train.config:TrainConfig",
    "bias": "kscale.bias.config:BiasConfig",
}
CLUSTER_SECTION = "kscale.targets.config:ClusterConfig"


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    kind: Literal["extract", "analyze", "train", "bias"] = doc("Which stage this job runs.")
    name: str = doc("Job name: used for actor names, submission ids and logs.", "kscale-job")
    model: ModelSpec | None = doc("The model (extract, train, bias).", None)
    data: DataSpec | None = doc("The dataset (extract, train, bias).", None)
    extract: ExtractSpec | None = doc("Extraction options (kind: extract).", None)
    output: OutputSpec = doc("Where results go.")
    resources: ResourcesSpec = doc("Workers and devices.", factory=ResourcesSpec)
    analyze: Any = doc("Analysis options (kind: analyze), see docs/analysis.md.", None)
    train: Any = doc("MaLoRA training options (kind: train), see docs/malora.md.", None)
    bias: Any = doc("Bias-diagnosis options (kind: bias).", None)
    cluster: Any = doc("Slurm / Kubernetes settings for `kscale submit --target`.", None)

    def fingerprint(self) -> str:
        """Hash of everything that determines the output (not resources or if_exists)."""
        d = to_dict(self)
        d.pop("resources", None)
        d.pop("cluster", None)
        d["output"].pop("if_exists", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- generic conversion


def _resolve(path: str) -> type:
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """Convert a YAML value into ``tp``; append problems and return None on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, problems)
    if origin in (typing.Union, types.UnionType):
        alts = typing.get_args(tp)
        if value is None and type(None) in alts:
            return None
        for alt in alts:
            if alt is type(None):
                continue
            trial: list[tuple[str, str]] = []
            out = convert(alt, value, where, trial)
            if not trial:
                return out
        # report the most specific failure: the alternative whose kind matches the value
        for alt in alts:
            if (typing.get_origin(alt) is list and isinstance(value, list)) or (
                dataclasses.is_dataclass(alt) and isinstance(value, dict)):
                return convert(alt, value, where, problems)
        problems.append((where, f"expected {' or '.join(_type_name(a) for a in alts)}, got {value!r}"))
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append((where, f"{value!r} is not one of {', '.join(map(repr, choices))}"))
            return None
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append((where, f"expected a list, got {value!r}"))
            return None
        return [convert(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((where, f"expected a mapping, got {value!r}"))
            return None
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((where, f"expected true or false, got {value!r}"))
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((where, f"expected an integer, got {value!r}"))
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((where, f"expected a number, got {value!r}"))
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append((where, f"expected a string, got {value!r}"))
            return None
        return value
    raise TypeError(f"spec type {tp!r} at {where} is not supported")  # a bug in a section definition


def _convert_dataclass(cls: type, value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    prefix = f"{where}." if where else ""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append((where, f"expected a mapping, got {value!r}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            problems.append((f"{prefix}{key}", f"unknown key (known: {', '.join(fields)})"))
    kwargs: dict[str, Any] = {}
    n_before = len(problems)
    for name, f in fields.items():
        if name in value:
            kwargs[name] = convert(hints[name], value[name], f"{prefix}{name}", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((f"{prefix}{name}", "required field is missing"))
    if len(problems) > n_before:
        return None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problems.extend((f"{prefix}{f}" if f else where, m) for f, m in validate())
    return obj


def to_dict(obj: Any) -> Any:
    """A spec (or section) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- loading


REQUIRED_BY_KIND = {
    "extract": ("model", "data"),
    "analyze": (),
    "train": ("model", "data"),
    "bias": ("model", "data"),
}


def spec_from_dict(raw: Any, source: str = "spec", check_model: bool = True) -> JobSpec:
    """Build and validate a JobSpec from parsed YAML; raise SpecError listing every problem."""
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise SpecError([("", f"the top level must be a mapping, got {type(raw).__name__}")], source)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError([("kind", f"{kind!r} is not one of {', '.join(KINDS)}")], source)
    hints = typing.get_type_hints(JobSpec)
    section_types = dict(hints)
    for k in ("analyze", "train", "bias"):
        section_types[k] = None
    if kind in STAGE_SECTIONS:
        try:
            section_types[kind] = _resolve(STAGE_SECTIONS[kind])
        except ImportError as e:  # the stage's optional dependencies are missing
            raise SpecError([(kind, f"stage {kind!r} is not available: {e}")], source) from e
    if raw.get("cluster") is not None:
        section_types["cluster"] = _resolve(CLUSTER_SECTION)
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append((key, f"unknown key (known: {', '.join(sorted(fields))})"))
        elif key in ("analyze", "train", "bias") and key != kind:
            problems.append((key, f"section {key!r} does not belong in a job of kind {kind!r}"))
        elif key == "extract" and kind not in ("extract",):
            problems.append((key, f"section 'extract' does not belong in a job of kind {kind!r}"))
        else:
            kwargs[key] = convert(section_types[key], value, key, problems)
    for req in REQUIRED_BY_KIND[kind] + ("output",):
        if raw.get(req) is None:
            problems.append((req, f"required for kind {kind!r}"))
    if kind == "extract" and "extract" not in raw:
        kwargs["extract"] = ExtractSpec()
    if kind in STAGE_SECTIONS and raw.get(kind) is None and kind not in kwargs:
        kwargs[kind] = convert(section_types[kind], {}, kind, problems)
    if problems:
        raise SpecError(problems, source)
    spec = JobSpec(**kwargs)
    if check_model and spec.model is not None:
        problems += check_against_model(spec)
    if problems:
        raise SpecError(problems, source)
    return spec


def check_against_model(spec: JobSpec) -> list[tuple[str, str]]:
    """Checks that need the model's config (layer and head ranges); reads only config.json."""
    from kscale.models.registry import read_model_config

    try:
        info = read_model_config(spec.model)
    except (OSError, ValueError) as e:
        return [("model.path", str(e))]
    out = []
    if spec.extract is not None:
        if spec.extract.layers != "all":
            for i, layer in enumerate(spec.extract.layers):
                if not -info.num_layers <= layer < info.num_layers:
                    out.append((f"extract.layers[{i}]", f"layer {layer} out of range (model has {info.num_layers})"))
        if spec.extract.heads != "all":
            for i, h in enumerate(spec.extract.heads):
                if not 0 <= h < info.num_kv_heads:
                    out.append((f"extract.heads[{i}]", f"KV head {h} out of range (model has {info.num_kv_heads})"))
    if spec.kind == "train" and spec.train is not None:
        for section in ("malora", "align"):
            layers = getattr(getattr(spec.train, section, None), "layers", "all")
            for i, layer in enumerate([] if layers == "all" else layers):
                if not -info.num_layers <= layer < info.num_layers:
                    out.append((f"train.{section}.layers[{i}]",
                                f"layer {layer} out of range (model has {info.num_layers})"))
    return out


def load_spec(path: str | Path, check_model: bool = True) -> JobSpec:
    """Read a job YAML (safe loading only) into a validated, frozen JobSpec."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([("", f"cannot read {p}: {e.strerror}")], str(p)) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([("", f"malformed YAML: {e}")], str(p)) from e
    return spec_from_dict(raw, str(p), check_model=check_model)


def explain(cls: type = JobSpec, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, doc) for every field, for `kscale validate --explain`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = "(see below)"
        else:
            default = "(required)"
        sub = _dataclass_in(tp)
        lazy = STAGE_SECTIONS.get(name) or (CLUSTER_SECTION if name == "cluster" else None)
        if sub is None and lazy is not None:
            try:
                sub = _resolve(lazy)
            except ImportError:
                sub = None
        rows.append((name, _type_name(tp), default, f.metadata.get("doc", "")))
        if sub is not None:
            rows += explain(sub, name + ".")
    return rows


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None
