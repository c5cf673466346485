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

from kscale.models.facts import FAMILIES, layer_problems

if typing.TYPE_CHECKING:  # imported lazily at run time (STAGE_SECTIONS): a stage's dependencies load with its kind
    from kscale.analysis.config import AnalyzeConfig
    from kscale.bias.config import BiasConfig
    from kscale.targets.config import ClusterConfig
    from kscale.train.config import TrainConfig

KINDS = ("extract", "analyze", "train", "bias")


class SpecError(ValueError):
    """A job spec failed to load; ``problems`` lists ``(dotted_field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {f}: {m}" if f else f"  {m}" for f, m in problems]
        super().__init__("\n".join(lines))


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A spec field: its one-line documentation, its default and optional bounds.

    Bounds apply to a number, or to every number of a list; ``load_spec`` (and :func:`section_problems`)
    report a violation as ``section.field: must be >= N (got X)``.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"doc": text, "bounds": bounds} if bounds else {"doc": text}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_LOWER = {"ge": (">=", "[", lambda v, b: v >= b), "gt": (">", "(", lambda v, b: v > b)}
_UPPER = {"le": ("<=", "]", lambda v, b: v <= b), "lt": ("<", ")", lambda v, b: v < b)}


def bound_problems(value: Any, bounds: dict[str, float], where: str) -> list[tuple[str, str]]:
    """``(where, "must be >= N (got X)")`` when the number ``value`` (or an item of a list) breaks ``bounds``."""
    if not bounds:
        return []
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in bound_problems(v, bounds, f"{where}[{i}]")]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    rules = {**_LOWER, **_UPPER}
    if all(rules[k][2](value, b) for k, b in bounds.items()):
        return []
    lower = [(k, b) for k, b in bounds.items() if k in _LOWER]
    upper = [(k, b) for k, b in bounds.items() if k in _UPPER]
    if lower and upper:
        (lk, lb), (uk, ub) = lower[0], upper[0]
        return [_ValueProblem((where, f"must be in {_LOWER[lk][1]}{lb}, {ub}{_UPPER[uk][1]} (got {value})"))]
    k, b = (lower or upper)[0]
    return [_ValueProblem((where, f"must be {rules[k][0]} {b} (got {value})"))]


class _ValueProblem(tuple):
    """A (field, message) problem of a well-typed value (not an allowed choice, out of bounds). The section
    is still built, so its cross-field checks run too and one load reports every problem."""


# ----------------------------------------------------------------------------- common sections


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    path: str = doc("Local checkpoint directory, a hub id, or `debug:qwen2_5_vl` / `debug:llava` "
                    "(a tiny random model saved to a local directory and loaded like a real one).")
    architecture: Literal[("auto", *FAMILIES)] = doc(  # type: ignore[valid-type]  (one family list)
        "Model family; `auto` reads `model_type` from the checkpoint's config.json.", "auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Weights dtype; `auto` is bfloat16 on CUDA and float32 on CPU.", "auto")
    device: Literal["auto", "cpu", "cuda"] = doc("Where the model runs; `auto` picks CUDA if visible.", "auto")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc(
        "Attention kernel. kscale hooks projections, so the fast kernel stays on.", "sdpa")
    trust_remote_code: bool = doc("Allow code shipped with the checkpoint to run. Off unless you trust it.", False)
    revision: str | None = doc("Hub revision (branch, tag or commit) when loading from the hub.", None)
    min_pixels: int | None = doc("Qwen2.5-VL image processor: fewest pixels per image (None: processor default).", None,
                                 gt=0)
    max_pixels: int | None = doc("Qwen2.5-VL image processor: most pixels per image (None: processor default).", None,
                                 gt=0)
    prompt_template: str | None = doc(
        "Prompt around the user text, with `{image}` where the image tokens go and `{text}` for the text. "
        "None: the family's chat format.", None)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.path:
            out.append(("path", "must be a directory, a hub id or debug:<family>"))
        elif self.path.startswith("debug:"):
            fam = self.path.split(":", 1)[1]
            if fam not in FAMILIES:
                out.append(("path", f"unknown debug model {fam!r} (choose {' or '.join('debug:' + f for f in FAMILIES)})"))
        elif _looks_like_path(self.path) and not Path(self.path).expanduser().is_dir():
            out.append(("path", f"model directory {self.path!r} does not exist"))
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            out.append(("min_pixels", f"{self.min_pixels} is above max_pixels {self.max_pixels}"))
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            out.append(("prompt_template", "must contain {text}"))
        return out


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") != 1 or Path(s).expanduser().exists()


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneratedDataSpec:
    n_samples: int = doc("How many synthetic samples to generate.", 64, ge=1)
    image_size: int = doc("Side of the square synthetic images in pixels.", 56, ge=8)
    seed: int = doc("Seed of the generator (same seed, same data).", 0)
    tasks: list[Literal["caption", "color", "shape", "count", "position", "conflict"]] = doc("Question kinds: caption, color, shape, count, position, conflict.",
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
    limit: int | None = doc("Use only the first N records.", None, ge=1)
    shard_size: int = doc("Samples per shard: the unit of work, retry and resume.", 16, ge=1)
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
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleTokens:
    text: Literal["all"] | int = doc("Text tokens kept per sample: all, or at most N chosen at random.", "all", ge=1)
    image: Literal["all"] | int = doc("Image tokens kept per sample: all, or at most N.", "all", ge=1)
    video: Literal["all"] | int = doc("Video tokens kept per sample: all, or at most N.", "all", ge=1)
    special: Literal["all"] | int = doc("Special tokens kept per sample: all, or at most N.", "all", ge=1)
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
    batch_size: int = doc("Samples per forward pass.", 4, ge=1)
    max_seq_len: int = doc("Longest sequence accepted; longer samples are recorded as errors and skipped.", 4096,
                           ge=8)
    key_dtype: Literal["float16", "float32"] = doc("dtype of stored keys. Non-finite values are an error.", "float16")
    attention: AttentionSpec = doc("Attention statistics (see docs/attention.md).", factory=AttentionSpec)

    def validate(self) -> list[tuple[str, str]]:
        out = []
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
    chunk_tokens: int = doc("Tokens per Zarr chunk along the token axis.", 4096, ge=1)
    compress_keys: bool = doc("Compress keys with zstd (fp16 keys shrink only ~8%; costs CPU).", False)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResourcesSpec:
    executor: Literal["ray", "local"] = doc("`ray`: a pool of Ray actors; `local`: in this process.", "ray")
    workers: int = doc("Number of workers (Ray actors), one per GPU on GPU machines.", 1, ge=1)
    gpus_per_worker: float = doc("GPUs per worker (0 on CPU machines).", 0, ge=0)
    cpus_per_worker: float = doc("CPUs per worker.", 1, gt=0)
    max_retries: int = doc("Attempts per shard after the first before it is quarantined.", 2, ge=0)
    torch_threads: int | None = doc("torch intra-op threads per worker (None: leave torch's default).", None)


# Stage sections defined beside their stage, imported only when a job of that kind is loaded.
STAGE_SECTIONS: dict[str, str] = {
    "analyze": "kscale.analysis.config:AnalyzeConfig",
    "train": "kscale.train.config:TrainConfig",
    "bias": "kscale.bias.config:BiasConfig",
}
CLUSTER_SECTION = "kscale.targets.config:ClusterConfig"
LAZY_SECTIONS = {**STAGE_SECTIONS, "cluster": CLUSTER_SECTION}


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    kind: Literal["extract", "analyze", "train", "bias"] = doc("Which stage this job runs.")
    name: str = doc("Job name: used for actor names, submission ids and logs.", "kscale-job")
    model: ModelSpec | None = doc("The model (extract, train, bias).", None)
    data: DataSpec | None = doc("The dataset (extract, train, bias).", None)
    extract: ExtractSpec | None = doc("Extraction options (kind: extract).", None)
    output: OutputSpec = doc("Where results go.")
    resources: ResourcesSpec = doc("Workers and devices.", factory=ResourcesSpec)
    analyze: AnalyzeConfig | None = doc("Analysis options (kind: analyze), see docs/analysis.md.", None)
    train: TrainConfig | None = doc("MaLoRA training options (kind: train), see docs/malora.md.", None)
    bias: BiasConfig | None = doc("Bias-diagnosis options (kind: bias).", None)
    cluster: ClusterConfig | None = doc("Slurm / Kubernetes settings for `kscale submit --target`.", None)

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


def _hints(cls: type) -> dict[str, Any]:
    """Field types of a section. JobSpec's lazy sections (``LAZY_SECTIONS``) read as ``Any | None`` here,
    without importing them; the loader and ``explain`` resolve the one a job uses."""
    if cls is not JobSpec:
        return typing.get_type_hints(cls)
    return typing.get_type_hints(cls, localns={p.rpartition(":")[2]: Any for p in LAZY_SECTIONS.values()})


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
            msg = f"{value!r} is not one of {', '.join(map(repr, choices))}"
            if isinstance(value, (str, int, float)):  # well typed: keep it, so cross-field checks still run
                problems.append(_ValueProblem((where, msg)))
                return value
            problems.append((where, msg))
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
            problems.extend(bound_problems(kwargs[name], f.metadata.get("bounds", {}), f"{prefix}{name}"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((f"{prefix}{name}", "required field is missing"))
    if any(not isinstance(p, _ValueProblem) for p in problems[n_before:]):
        return None  # a value of the wrong type: the section cannot be built
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problems.extend((f"{prefix}{f}" if f else where, m) for f, m in validate())
    return obj


def section_problems(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every problem of a section built in code rather than loaded (e.g. a ``MaLoRAConfig`` read back from
    an adapter): the same Literal and bound checks as ``load_spec``, nested sections, then ``validate()``."""
    out: list[tuple[str, str]] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += section_problems(value, f"{prefix}{f.name}.")
            continue
        convert(hints[f.name], value, f"{prefix}{f.name}", out)
        out += bound_problems(value, f.metadata.get("bounds", {}), f"{prefix}{f.name}")
    validate = getattr(obj, "validate", None)
    if validate is not None:
        out += [(f"{prefix}{f}", m) for f, m in validate()]
    return [tuple(p) for p in out]


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
    section_types = _hints(JobSpec)
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
    selections = []  # (dotted field, layers) of every layer selection the job makes
    if spec.extract is not None:
        selections.append(("extract.layers", spec.extract.layers))
    if spec.kind == "train" and spec.train is not None:
        selections += [("train.malora.layers", spec.train.malora.layers), ("train.align.layers", spec.train.align.layers)]
    if spec.kind == "bias" and spec.bias is not None:
        selections.append(("bias.dropping.attention_layers", spec.bias.dropping.attention_layers))
    for name, layers in selections:
        out += layer_problems(layers, info.num_layers, name)
    if spec.extract is not None:
        if spec.extract.heads != "all":
            for i, h in enumerate(spec.extract.heads):
                if not 0 <= h < info.num_kv_heads:
                    out.append((f"extract.heads[{i}]", f"KV head {h} out of range (model has {info.num_kv_heads})"))
    return out


def load_spec(path: str | Path, check_model: bool = True, overrides: tuple[str, ...] | list[str] = ()) -> JobSpec:
    """Read a job YAML (safe loading only) into a validated, frozen JobSpec; ``overrides`` are
    ``a.b=c`` strings (``kscale submit --set``) applied to the YAML before validation."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([("", f"cannot read {p}: {e.strerror}")], str(p)) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([("", f"malformed YAML: {e}")], str(p)) from e
    if not overrides:
        return spec_from_dict(raw, str(p), check_model=check_model)
    raw, bad = apply_overrides(raw, overrides)
    try:
        spec = spec_from_dict(raw, str(p), check_model=check_model)
    except SpecError as e:  # every problem at once: the malformed overrides and the spec's own
        raise SpecError(bad + e.problems, str(p)) from None
    if bad:
        raise SpecError(bad, str(p))
    return spec


def apply_overrides(raw: Any, overrides: tuple[str, ...] | list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Set each ``a.b=c`` (the value parsed as a YAML scalar or flow value: ``8`` is an int, ``[0, 3]`` a
    list, ``null`` None) in a copy of the raw YAML mapping, validated afterwards like any YAML; returns the
    copy and the problems of the overrides that could not be applied."""
    import copy

    raw = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(("--set", f"{item[:80]!r} is not KEY=VALUE with a dotted KEY (e.g. data.n_samples=8)"))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append((key, f"--set value {text[:80]!r} is not a YAML value: {e}"))
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problems.append((key, f"--set: {'.'.join(parts[:i + 1])} is not a section"))
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return raw, problems


def explain(cls: type = JobSpec, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, doc) for every field, for `kscale validate --explain`."""
    rows = []
    hints = _hints(cls)
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
        type_name = _type_name(tp)
        lazy = LAZY_SECTIONS.get(name) if cls is JobSpec else None
        if lazy is not None:
            type_name = f"{lazy.rpartition(':')[2]} | None"
            try:
                sub = _resolve(lazy)
            except ImportError:
                sub = None
        bounds = f.metadata.get("bounds", {})
        limits = ", ".join(f"{({**_LOWER, **_UPPER})[k][0]} {b}" for k, b in bounds.items())
        rows.append((name, type_name, default, f.metadata.get("doc", "") + (f" ({limits})" if limits else "")))
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
