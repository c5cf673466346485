"""Job specs: one YAML file in, one frozen ``JobSpec`` out.

Every section is a frozen dataclass whose fields carry a one-line ``doc`` in their metadata (that text
feeds ``kscale validate --explain`` and ``kscale schema``). ``load_spec`` parses YAML with ``safe_load``
only, converts mappings into dataclasses by their type hints, rejects unknown keys and collects *every*
problem, each named by its dotted field and quoting the bad value, before raising one ``SpecError``.

The package, from the bottom up (it imports no stage: stages import it):

- ``fields.py``: the field helper :func:`doc` (with bounds), the conversion and checks every section gets
  (:func:`convert`, :func:`section_problems`), :func:`to_dict`;
- the stage sections, each in its own module: ``analyze.py`` (``AnalyzeConfig``), ``train.py``
  (``TrainConfig``) with ``malora.py`` (``MaLoRAConfig``, also the adapter's saved config), ``bias.py``
  (``BiasConfig``), ``eval.py`` (``EvalStageConfig``), ``cluster.py`` (``ClusterConfig``, the ``cluster:`` section
  of ``kscale submit``), ``adapter.py`` (``AdapterSpec``, the ``extract.adapter`` section, and which kind of
  adapter a directory holds);
- this module: the common sections (model, data, extract, output, resources), ``JobSpec``, the YAML
  loader and ``explain``. Every name above is importable from ``kscale.spec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kscale.errors import KscaleError, shown
from kscale.models.facts import FAMILIES, layer_problems
from kscale.spec.adapter import AdapterSpec  # noqa: F401  (re-exported)
from kscale.spec.analyze import AnalyzeConfig
from kscale.spec.bias import BiasConfig
from kscale.spec.cluster import ClusterConfig, cluster_of  # noqa: F401  (re-exported)
from kscale.spec.eval import EvalStageConfig, EvalVariant  # noqa: F401  (re-exported)
from kscale.spec.fields import (  # noqa: F401  (re-exported: the field helper and checks of every section)
    bound_problems, bounds_text, convert, did_you_mean, doc, section_problems, to_dict, type_text,
)
from kscale.spec.malora import MaLoRAConfig  # noqa: F401  (re-exported)
from kscale.spec import stages as _stages  # the entry type (not a section: no field docs)
from kscale.spec.train import TrainConfig


MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB; a bigger file is refused before parsing
MAX_YAML_ALIASES = 100  # `*name` references in one spec
MAX_YAML_NODES = 100_000  # scalars, lists and mappings once every alias is expanded
MAX_YAML_DEPTH = 64  # lists and mappings inside one another (a job spec nests 3 or 4 deep)


class SpecError(KscaleError, ValueError):
    """A job spec failed to load; ``problems`` lists ``(dotted_field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {f}: {m}" if f else f"  {m}" for f, m in problems]
        super().__init__("\n".join(lines))


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
        "Overrides the checkpoint's own chat template. None: the chat template (native), or the family's "
        "built-in template where the checkpoint has none (the store records which).", None)

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
    source: Literal["generated", "manifest", "hf_disk", "parquet", "hf", "webdataset"] = doc(
        "`generated` (synthetic shapes), `manifest` (JSONL, image paths relative to it), `hf_disk` (a Hugging "
        "Face dataset saved with save_to_disk), `parquet` (Parquet files, images as paths or embedded bytes), "
        "`hf` (datasets.load_dataset: a hub id or a local folder, from the local cache when offline) or "
        "`webdataset` (tar shards of {key}.jpg|png + {key}.json|txt). See docs/data.md.", "generated")
    path: str | None = doc("The manifest file, the saved dataset directory, the Parquet file(s) or tar shard(s) "
                           "(a path, a glob or a folder), or the `hf` dataset name.", None)
    split: str | None = doc("Split of a saved DatasetDict (hf_disk) or of the loaded dataset (hf; default train).",
                            None)
    config: str | None = doc("`hf`: the dataset's configuration (load_dataset's second argument, e.g. MMMU's "
                             "subject).", None)
    revision: str | None = doc("`hf`: the dataset revision (branch, tag or commit).", None)
    image_field: str | list[str] = doc(
        "Record field holding the image (path, bytes or a {bytes, path} struct; a list of them for several "
        "images), or a list of fields each holding one image (MMMU's image_1 .. image_7; empty ones skipped). "
        "WebDataset: a member extension such as `jpg` (default `image`: the sample's first image member).", "image")
    text_field: str = doc("Record field holding the text / prompt.", "text")
    answer_field: str | None = doc("Record field with the answer (training and bias jobs).", "answer")
    id_field: str | None = doc("Record field with a stable id (recorded in the store); None: the row number "
                               "(webdataset: the sample's key).", None)
    turns_field: str | None = doc(
        "Record field holding a conversation: LLaVA-style `conversations` ([{from: human|gpt|system, value}], "
        "`<image>` where an image goes) or OpenAI-style `messages` ([{role, content}], content a string or "
        "parts {type: text|image}). Every assistant turn is an answer span. None: text_field and answer_field.",
        None)
    max_images: int = doc("Most images in one record; a record with more is that record's error.", 16, ge=1)
    video_field: str | None = doc(
        "Record field holding a video (a folder of frames, or an animated GIF/WebP/PNG: a path relative to the "
        "data like images, or the file's bytes) or a list of them; `<video>` / `<video N>` in the text place "
        "them (else they open the first user turn). For the video families (`kscale models`). None: no video.",
        None)
    video_fps: float | None = doc("Frames per second sampled from each video (None: every frame); a frame folder "
                                  "plays at 1 frame per second.", 2.0, gt=0)
    max_frames: int = doc("Most frames kept per video, evenly spread (first and last kept).", 32, ge=1)
    limit: int | None = doc("Use only the first N records.", None, ge=1)
    shard_size: int = doc("Samples per shard: the unit of work, retry and resume.", 16, ge=1)
    max_image_pixels: int = doc(
        "Largest image accepted, in pixels (width x height), checked from the file's header before decoding; "
        "a bigger image is that record's error. 50 Mpx decodes to 150 MB as RGB.", 50_000_000, ge=1)
    generated: GeneratedDataSpec = doc("Options of the generated source.", factory=GeneratedDataSpec)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.source not in ("manifest", "hf_disk", "parquet", "hf", "webdataset"):
            return out
        if not self.path:
            return [("path", f"required for source {self.source!r}")]
        if self.source in ("manifest", "hf_disk"):
            if not Path(self.path).expanduser().exists():
                out.append(("path", f"{self.path!r} does not exist"))
            elif self.source == "manifest" and not Path(self.path).is_file():
                out.append(("path", f"{self.path!r} is not a file"))
        elif self.source in ("parquet", "webdataset"):
            from kscale.data.files import data_files

            try:
                data_files(self.path, ".parquet" if self.source == "parquet" else ".tar")
            except ValueError as e:
                out.append(("path", str(e)))
        if isinstance(self.image_field, list) and not self.image_field:
            out.append(("image_field", "an empty list names no image field"))
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
    store_queries: bool = doc("Also store query vectors (same sampling and layout as keys); the same as adding "
                              "`q` to `extract.vectors`.", False)


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
    vectors: list[Literal["q", "k", "v"]] = doc(
        "Vectors to store, each hooked on its own projection: k (keys, per KV head; always stored: the token "
        "table lives with them), q (queries, per query head reading the kept KV heads), v (values, per KV head). "
        "q and k are stored pre-RoPE; see docs/store.md.", factory=lambda: ["k"])
    attention: AttentionSpec = doc("Attention statistics (see docs/attention.md).", factory=AttentionSpec)
    adapter: AdapterSpec | None = doc(
        "An adapter applied to the model before the hooks (MaLoRA or PEFT LoRA): the stored keys are the adapted "
        "projections' outputs. Recorded in the store's root attributes (kind, path, a hash of its files); resume "
        "refuses a store extracted with another adapter. See docs/malora.md.", None)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The vectors written, in ``q, k, v`` order: ``vectors`` plus q with ``attention.store_queries``."""
        want = set(self.vectors) | ({"q"} if self.attention.store_queries else set())
        return tuple(k for k in ("q", "k", "v") if k in want)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if "k" not in self.vectors:
            out.append(("vectors", f"{self.vectors} lacks k: keys are always stored (they carry the token table "
                                   "every kind is aligned with)"))
        if len(set(self.vectors)) != len(self.vectors):
            out.append(("vectors", f"duplicate kinds in {self.vectors}"))
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
    torch_threads: int | None = doc("torch intra-op threads per worker (None: leave torch's default).", None, ge=1)
    placement_timeout_s: float = doc(
        "Ray executor: seconds to wait while no worker has been placed (no node has the CPUs/GPUs a worker asks "
        "for) before the run fails naming resources.gpus_per_worker / cpus_per_worker.", 600, gt=0)


def _analyze_scheduler_file(spec: "JobSpec", path: str) -> "JobSpec":
    dask_cfg = dataclasses.replace(spec.analyze.dask, scheduler="distributed", scheduler_file=path)
    return dataclasses.replace(spec, analyze=dataclasses.replace(spec.analyze, dask=dask_cfg))


# Stages as a table (kscale.spec.stages): every kind's section, needs, entry, output and cluster needs.
STAGES: dict[str, _stages.Stage] = {s.kind: s for s in (
    _stages.Stage("extract", ExtractSpec, ("model", "data"), "kscale.extract.run:stage_entry",
          "keys (and queries, attention statistics) of every token into a Zarr store, shard by shard",
          "a key store"),
    _stages.Stage("analyze", AnalyzeConfig, (), "kscale.analysis.run:stage_entry",
          "MMD, JSD and their intra-modal baselines per layer and head, with figures and a report",
          "an analysis run", runtime="dask", path_fields=("stores",), final_progress=True,
          cluster_cpus=lambda spec: max(1, spec.analyze.dask.n_workers),
          use_scheduler_file=_analyze_scheduler_file),
    _stages.Stage("train", TrainConfig, ("model", "data"), "kscale.train.run:stage_entry",
          "MaLoRA with DeepSpeed, then the before/after table", "a training run", final_progress=True),
    _stages.Stage("bias", BiasConfig, ("model", "data"), "kscale.bias.run:stage_entry",
          "counterfactual images, blind baselines and token dropping: how much answers use the image",
          "a bias run"),
    _stages.Stage("eval", EvalStageConfig, ("model",), "kscale.eval.run:stage_entry",
          "lmms-eval benchmarks of the base model and its adapters, with and without the image (blind baseline)",
          "an eval run", path_fields=("include_path",),
          workers="the ranks of one process group (Ray actors; or torchrun -m kscale.eval), each answering every "
                  "N-th document of each task, gathered on rank 0"),
)}
KINDS = tuple(STAGES)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    kind: Literal[KINDS] = doc("Which stage this job runs.")  # type: ignore[valid-type]
    name: str = doc("Job name: used for actor names, submission ids and logs.", "kscale-job")
    model: ModelSpec | None = doc("The model (extract, train, bias).", None)
    data: DataSpec | None = doc("The dataset (extract, train, bias).", None)
    extract: ExtractSpec | None = doc("Extraction options (kind: extract).", None)
    output: OutputSpec = doc("Where results go.")
    resources: ResourcesSpec = doc("Workers and devices.", factory=ResourcesSpec)
    analyze: AnalyzeConfig | None = doc("Analysis options (kind: analyze), see docs/analysis.md.", None)
    train: TrainConfig | None = doc("MaLoRA training options (kind: train), see docs/malora.md.", None)
    bias: BiasConfig | None = doc("Bias-diagnosis options (kind: bias).", None)
    eval: EvalStageConfig | None = doc("Benchmark options (kind: eval), see docs/malora.md.", None)
    cluster: ClusterConfig | None = doc("Slurm / Kubernetes settings for `kscale submit --target`.", None)

    def fingerprint(self) -> str:
        """Hash of everything that determines the output (not resources or if_exists), the data's content
        included (a manifest's bytes, a saved dataset's fingerprints: :mod:`kscale.data.identity`)."""
        from kscale.data.identity import data_identity

        d = to_dict(self)
        if self.data is not None and self.data.source != "generated":  # generated data: its parameters
            d["data_content"] = data_identity(self.data, images=False)
        d.pop("resources", None)
        d.pop("cluster", None)
        d["output"].pop("if_exists", None)
        if (d.get("extract") or {}).get("vectors") == ["k"]:  # the default: fingerprints of older stores hold
            d["extract"].pop("vectors")
        if "adapter" in (d.get("extract") or {}) and d["extract"]["adapter"] is None:  # likewise: no adapter
            d["extract"].pop("adapter")
        if (d.get("analyze") or {}).get("vector") == "k":
            d["analyze"].pop("vector")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def spec_from_dict(raw: Any, source: str = "spec", check_model: bool = True) -> JobSpec:
    """Build and validate a JobSpec from parsed YAML; raise SpecError listing every problem."""
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise SpecError([("", f"the top level must be a mapping, got {type(raw).__name__}")], source)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError([("kind", f"{shown(kind)} is not one of {', '.join(KINDS)}{did_you_mean(kind, KINDS)}")],
                        source)
    stage = STAGES[kind]
    section_types = typing.get_type_hints(JobSpec)
    section_types[kind] = stage.section  # the kind's own section is built (defaults, checks) even when left empty
    if raw.get("cluster") is not None:  # a mapping, not "ClusterConfig or null", in its error messages
        section_types["cluster"] = ClusterConfig
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append((key, f"unknown key{did_you_mean(key, fields)} (known: {', '.join(sorted(fields))})"))
        elif key in STAGES and key != kind:
            problems.append((key, f"section {key!r} does not belong in a job of kind {kind!r}"))
        else:
            kwargs[key] = convert(section_types[key], value, key, problems)
    for req in stage.needs + ("output",):
        if raw.get(req) is None:
            problems.append((req, f"required for kind {kind!r}"))
    if raw.get(kind) is None and kind not in kwargs:
        kwargs[kind] = convert(section_types[kind], {}, kind, problems)
    if check_model and isinstance(kwargs.get("model"), ModelSpec) and not any(f == "model.path" for f, _ in problems):
        # the model's ranges are checked even when other sections have problems: one pass reports all
        sections = types.SimpleNamespace(kind=kind, **{k: kwargs.get(k) for k in ("model", "extract", "train", "bias")})
        problems += check_against_model(sections)  # type: ignore[arg-type]
    if problems:
        raise SpecError(problems, source)
    return JobSpec(**kwargs)


def check_against_model(spec: JobSpec) -> list[tuple[str, str]]:
    """Checks that need the model's config (layer and head ranges); reads only config.json. ``spec`` may be
    a partly built job (any object with ``kind``, ``model``, ``extract``, ``train``, ``bias``): sections that
    failed to build are None and skipped."""
    from kscale.models.registry import read_model_config

    try:
        info = read_model_config(spec.model)
    except (OSError, ValueError) as e:
        return [("model.path", str(e))]
    out = []
    selections = []  # (dotted field, layers) of every layer selection the job makes
    if spec.extract is not None:
        selections.append(("extract.layers", spec.extract.layers))
    if spec.kind == "train" and spec.train is not None and spec.train.malora is not None and spec.train.align is not None:
        selections += [("train.malora.layers", spec.train.malora.layers), ("train.align.layers", spec.train.align.layers)]
    if spec.kind == "bias" and spec.bias is not None and spec.bias.dropping is not None:
        selections.append(("bias.dropping.attention_layers", spec.bias.dropping.attention_layers))
    for name, layers in selections:
        if layers is not None and not (isinstance(layers, list) and None in layers):
            out += layer_problems(layers, info.num_layers, name)
    if spec.extract is not None and isinstance(spec.extract.heads, list):
        for i, h in enumerate(spec.extract.heads):
            if isinstance(h, int) and not 0 <= h < info.num_kv_heads:
                out.append((f"extract.heads[{i}]", f"KV head {h} out of range (model has {info.num_kv_heads})"))
    return out


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts aliases while composing (``MAX_YAML_ALIASES``): with the expansion
    check of :func:`parse_yaml` a 1 KB "billion laughs" file is refused before anything is built. It also
    bounds nesting (``MAX_YAML_DEPTH``): PyYAML composes recursively, so 5,000 ``[`` would otherwise end in
    a ``RecursionError`` traceback."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.n_aliases, self.depth = 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.n_aliases += 1
            if self.n_aliases > MAX_YAML_ALIASES:
                raise _TooBig(f"more than {MAX_YAML_ALIASES} aliases (*name); a job spec needs few or none")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _TooBig(f"nested more than {MAX_YAML_DEPTH} levels deep; a job spec nests a few")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooBig(Exception):
    pass


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes of ``node`` with every alias expanded, counted without expanding (shared nodes memoised);
    raises _TooBig past ``MAX_YAML_NODES`` or on an alias inside itself."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _TooBig("an alias refers to a node that contains it (a recursive structure)")
    active.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [x for kv in node.value for x in kv]
    else:
        children = []
    for child in children:
        n += _expanded_nodes(child, memo, active)
        if n > MAX_YAML_NODES:
            raise _TooBig(f"more than {MAX_YAML_NODES} values once aliases are expanded")
    active.discard(key)
    memo[key] = n
    return n


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with bounds: at most ``MAX_YAML_ALIASES`` aliases and ``MAX_YAML_NODES`` values
    after expansion (an alias bomb is refused in milliseconds). Raises ``yaml.YAMLError`` or ``ValueError``."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set())
        return loader.construct_document(node)
    except _TooBig as e:
        raise ValueError(str(e)) from None
    except RecursionError:  # a backstop: the depth bound above refuses such files first
        raise ValueError("nested too deeply to read") from None
    finally:
        loader.dispose()


def load_spec(path: str | Path, check_model: bool = True, overrides: tuple[str, ...] | list[str] = ()) -> JobSpec:
    """Read a job YAML (safe loading only, at most ``MAX_SPEC_BYTES``, aliases bounded) into a validated,
    frozen JobSpec; ``overrides`` are ``a.b=c`` strings (``kscale submit --set``) applied to the YAML before
    validation."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError([("", f"cannot read {p}: {e.strerror}")], str(p)) from e
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([("", f"larger than {MAX_SPEC_BYTES} bytes: a job spec is a few KB")], str(p))
    try:
        raw = parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError([("", f"not UTF-8 text (byte {e.start})")], str(p)) from None
    except yaml.YAMLError as e:
        raise SpecError([("", f"malformed YAML: {e}")], str(p)) from None
    except ValueError as e:
        raise SpecError([("", f"refused YAML: {e}")], str(p)) from None
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
            value = parse_yaml(text) if text.strip() else ""
        except (yaml.YAMLError, ValueError) as e:
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
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = "(see below)" if dataclasses.is_dataclass(made) else repr(made)
        else:
            default = "(required)"
        sub = _dataclass_in(tp)
        type_name = type_text(tp)
        if cls is JobSpec and sub is not None and sub.__module__ != __name__:  # sections of their own modules:
            type_name = f"{sub.__name__} | None"  # by class name (the common sections print with their module)
        limits = bounds_text(f.metadata.get("bounds", {}))
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
