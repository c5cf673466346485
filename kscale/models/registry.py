"""Model knowledge in one place: which family a checkpoint is, how to load it, where its projections are.

An ``Adapter`` per family (``qwen2_5_vl.py``, ``llava.py``, ``llava_next.py``, ...: one file per transformers
``model_type``, listed in ``facts.FAMILIES``) answers every architecture question the rest
of kscale asks: the language model's query/key/value projection modules (never the vision tower's), the
rotary embedding module (hooked to capture the positions the model really used), the RoPE positions of
a full sequence, how to run the vision tower, the visual token ids, how samples (``kscale.models.inputs``:
turns of text and media, several images or videos each) become a padded batch, and the modality tag of
every token.

Legend: B batch, T tokens (padded), R rope position rows (3 for Qwen's M-RoPE, 1 for 1-D RoPE).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from kscale.models.inputs import Media, Sample, Video
from kscale.models.facts import (  # noqa: F401  (re-exported: the registry answers every architecture fact)
    FAMILIES, IMAGE, MALORA_TARGET_NAMES, MALORA_TARGETS, MODALITIES, MODALITY_CODES, MODALITY_NAMES, PAD,
    SPECIAL, TEXT, VIDEO, attention_scaling, head_dim, layer_problems, resolve_layers,
)


@runtime_checkable
class ModelOptions(Protocol):
    """What loading a model reads from the job's ``model:`` section. ``kscale.spec.ModelSpec`` is the one
    implementation; models sit below the spec and never import it (tests/unit/test_imports.py)."""

    @property
    def path(self) -> str: ...  # a directory, a hub id or debug:<family>
    @property
    def architecture(self) -> str: ...  # a family, or "auto" (config.json's model_type)
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def attn_implementation(self) -> str: ...
    @property
    def trust_remote_code(self) -> bool: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def min_pixels(self) -> int | None: ...
    @property
    def max_pixels(self) -> int | None: ...
    @property
    def prompt_template(self) -> str | None: ...


@dataclass(frozen=True)
class ModelInfo:
    """What kscale needs from a config.json, read without loading weights."""

    family: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    config_hash: str
    path: str


@dataclass
class LoadedModel:
    adapter: "Adapter"
    model: torch.nn.Module
    tokenizer: Any
    image_processor: Any
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    processor_settings: dict = field(default_factory=dict)
    template: str = "{image}{text}"  # kscale's template string (built-in or override; see ``prompt``)
    prompt: Any = None  # kscale.models.prompts.PromptTemplate: native (the chat template), override or built-in


@dataclass
class Batch:
    """A padded model batch plus the per-token facts kscale records."""

    inputs: dict[str, torch.Tensor]  # what the model's forward takes
    modality_BT: torch.Tensor  # int8 tags, PAD where attention_mask is 0
    image_index_BT: torch.Tensor  # int16: which image of the sample (-1 for non-image tokens)
    answer_mask_BT: torch.Tensor  # bool: tokens of the answer span (all False without answers)
    n_image_tokens: list[int]  # processor formula per sample (sum over its images)
    # int16: which video of the sample, int32: which frame of it; -1 outside video blocks and on their wrappers
    # (a block's text, Qwen3-VL's "<t seconds>", carries its frame)
    video_index_BT: torch.Tensor | None = None
    frame_BT: torch.Tensor | None = None
    time_BT: torch.Tensor | None = None  # float32 seconds of that frame (NaN elsewhere); None without video


def resolve_model_path(path: str) -> str:
    if path.startswith("debug:"):
        from kscale.models.debug import debug_model_dir

        return debug_model_dir(path.split(":", 1)[1])
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path


def read_config_json(mspec: ModelOptions) -> tuple[dict, str]:
    """(config dict, short hash) of a checkpoint: its config.json, or the hub's config for a hub id."""
    path = resolve_model_path(mspec.path)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        text = cfg_file.read_text()
        return json.loads(text), hashlib.sha256(text.encode()).hexdigest()[:16]
    if Path(path).exists():
        raise ValueError(f"{path!r} has no config.json: not a transformers checkpoint")
    # a hub id: let transformers fetch the config (fails clearly when offline)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, revision=mspec.revision, trust_remote_code=mspec.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes a clear boundary error
        raise ValueError(f"cannot read model {path!r}: not a local directory and the hub lookup failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    d = cfg.to_dict()
    return d, hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_model_config(mspec: ModelOptions) -> ModelInfo:
    """ModelInfo from the checkpoint's config.json (no weights)."""
    cfg, digest = read_config_json(mspec)
    model_type = cfg.get("model_type", "")
    family = mspec.architecture if mspec.architecture != "auto" else model_type
    if family not in ADAPTERS:
        raise ValueError(f"model {mspec.path!r}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(ADAPTERS)}; set model.architecture to force one)")
    return _info(cfg, family, digest, resolve_model_path(mspec.path))


def model_info(model: torch.nn.Module) -> ModelInfo:
    """ModelInfo of a model already in memory (its config; no path, no hash), e.g. one MaLoRA wraps."""
    cfg = model.config.to_dict()
    return _info(cfg, cfg.get("model_type", ""), "", "")


def _info(cfg: dict, family: str, digest: str, path: str) -> ModelInfo:
    """The one reading of a config dict's language-model dimensions."""
    text = cfg.get("text_config") or cfg
    heads = text["num_attention_heads"]
    return ModelInfo(
        family=family, model_type=cfg.get("model_type", ""), num_layers=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads, head_dim=head_dim(text),
        hidden_size=text["hidden_size"], config_hash=digest, path=path,
    )


def get_adapter(family: str) -> "Adapter":
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r} (supported: {', '.join(ADAPTERS)})")
    return ADAPTERS[family]()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device: 'cuda' requested but no CUDA device is visible")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(mspec: ModelOptions, n_devices: int = 1, devices: list[str] | None = None) -> LoadedModel:
    """Load model, tokenizer and image processor with the real ``from_pretrained`` path.

    ``n_devices > 1`` spreads the model over that many GPUs (``resources.gpus_per_worker``) by the
    balanced plan of :func:`plan_device_map`; ``devices`` says where plan device i goes (default
    ``cuda:i``; the tests pass ``["cpu", "disk"]`` to run a split model on a CPU machine)."""
    info = read_model_config(mspec)
    adapter = get_adapter(info.family)
    device = pick_device(mspec.device)
    dtype = pick_dtype(mspec.dtype, device)
    if n_devices > 1 and devices is None:
        devices = _visible_gpus(n_devices, device)
    return adapter.load(mspec, info, device, dtype, devices if n_devices > 1 else None)


def _zero3_partitioned() -> bool:
    """True inside :func:`kscale.train.engine.partitioned_loading` (``from_pretrained`` runs zero.Init)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _visible_gpus(n: int, device: torch.device) -> list[str]:
    if device.type != "cuda":
        raise ValueError(f"resources.gpus_per_worker: {n} spreads the model over {n} GPUs, but model.device "
                         f"is {device.type!r}")
    if torch.cuda.device_count() < n:
        import os

        raise ValueError(f"resources.gpus_per_worker: {n} GPUs per worker, but this worker sees "
                         f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return [f"cuda:{i}" for i in range(n)]


def plan_device_map(model_class: str, config: Any, n_devices: int, dtype: torch.dtype,
                    device_bytes: int | None = None) -> dict[str, int]:
    """Module name -> device index 0..n-1: whole decoder layers and vision blocks, balanced by bytes.

    Built on the meta device (no memory): accelerate's ``get_balanced_memory`` turns ``device_bytes``
    per device (default: all of the model on each) into an even budget, ``infer_auto_device_map`` fills
    devices in module order within it. The vision tower and the embeddings land on device 0 (inputs go
    there), the LM head on the last. Raises when the model does not fit ``n_devices x device_bytes``.
    """
    try:
        import transformers
        from accelerate import init_empty_weights
        from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    except ImportError as e:
        raise ImportError("a model spread over several GPUs needs accelerate: pip install accelerate") from e
    with init_empty_weights():
        model = getattr(transformers, model_class)._from_config(config, dtype=dtype)
    no_split = sorted(model._no_split_modules)
    total = compute_module_sizes(model, dtype=dtype)[""]
    budget = {i: device_bytes or total for i in range(n_devices)}
    balanced = get_balanced_memory(model, budget, no_split_module_classes=no_split, dtype=dtype)
    plan = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    stray = sorted({str(d) for d in plan.values() if not isinstance(d, int)})
    if stray:
        raise ValueError(f"model of {total / 2**30:.1f} GiB does not fit {n_devices} device(s) of "
                         f"{(device_bytes or total) / 2**30:.1f} GiB (plan spills to {stray}); "
                         "raise resources.gpus_per_worker")
    return plan


class Adapter:
    """Family-specific knowledge; subclasses fill in the hooks below."""

    family: str = ""
    model_class: str = ""
    # What kscale does with this family (``kscale models``, the README's table): a subset of CAPABILITIES.
    supports: tuple[str, ...] = ("keys", "queries", "attention", "train", "bias")
    default_template: str = "{image}{text}"
    rope_rows: int = 1  # rows of RoPE positions per token: 1 for 1-D RoPE, 3 for Qwen's M-RoPE
    # Which attention sub-module's output a stored key is (the store's ``key_source``, ``kscale info``):
    # ``k_proj``, or ``k_norm`` where the model normalises keys per head before RoPE (QK-norm).
    key_source: str = "k_proj"
    add_bos: bool = False  # prepend the tokenizer's BOS (Llama-style tokenizers add it themselves)
    # Raised when the tokens this family renders for the same sample change (Qwen3-VL's video block, 2026-12-03):
    # a store records it (``model.tokens_revision``, absent = 1) and a resume refuses another, so that no store
    # mixes two tokenisations.
    tokens_revision: int = 1
    # The tiny random model of ``debug:<family>`` (kscale.models.debug): its tokenizer's special tokens
    # ("special": the first ids, in order) and PreTrainedTokenizerFast arguments, and debug_model().
    debug_tokens: dict = {}
    # A Jinja chat template the tiny model's tokenizer gets with ``build_debug_model(..., chat_template=True)``
    # (tests of the native prompt path); ``debug:<family>`` itself has none (the built-in template).
    debug_chat_template: str | None = None

    def debug_model(self, tokenizer) -> tuple[torch.nn.Module, Any]:
        """(tiny random model, image processor) of this family over ``tokenizer`` (debug_tokens)."""
        raise NotImplementedError

    # -- loading
    def load(self, mspec: ModelOptions, info: ModelInfo, device: torch.device, dtype: torch.dtype,
             devices: list[str] | None = None) -> LoadedModel:
        """Load on ``device``, or spread over ``devices`` (plan device i -> ``devices[i]``) with inputs
        going to where the plan puts the embeddings."""
        import transformers
        from transformers import AutoTokenizer

        cls = getattr(transformers, self.model_class)
        common = dict(revision=mspec.revision, trust_remote_code=mspec.trust_remote_code)
        if devices:
            model = self._load_spread(cls, mspec, info, dtype, devices, common)
            device = torch.device(devices[0])
        elif device.type == "cuda" and not _zero3_partitioned():  # straight to the GPU, never whole in host RAM
            model = cls.from_pretrained(info.path, dtype=dtype, attn_implementation=mspec.attn_implementation,
                                        device_map={"": str(device)}, **common)
        else:
            model = cls.from_pretrained(info.path, dtype=dtype, attn_implementation=mspec.attn_implementation,
                                        **common)
            if not _zero3_partitioned():  # partitioned parameters already sit where DeepSpeed put them
                model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(info.path, **common)
        tokenizer.padding_side = "right"
        image_processor = self.load_image_processor(info.path, common, mspec)
        settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
        prompt = self.prompt_template(mspec, info, tokenizer)
        template = prompt.text if prompt.kind != "native" else self.default_template
        return LoadedModel(self, model, tokenizer, image_processor, info, device, dtype, settings, template, prompt)

    def prompt_template(self, mspec: ModelOptions, info: ModelInfo, tokenizer):
        """The job's :class:`kscale.models.prompts.PromptTemplate`: ``model.prompt_template``, else the
        checkpoint's chat template, else :attr:`default_template` (also what the store records)."""
        from kscale.models.prompts import find_chat_template, resolve_prompt

        native = None if mspec.prompt_template is not None else find_chat_template(info.path, tokenizer, mspec.revision)
        return resolve_prompt(mspec.prompt_template, self.default_template, native)

    def _load_spread(self, cls, mspec: ModelOptions, info: ModelInfo, dtype: torch.dtype, devices: list[str],
                     common: dict) -> torch.nn.Module:
        """``from_pretrained`` with a balanced ``device_map`` over ``devices`` (weights load straight to
        their device, never whole on one). On CUDA each device's budget is its free memory less 10%."""
        import tempfile

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(info.path, **common)
        free = [int(torch.cuda.mem_get_info(torch.device(d))[0] * 0.9) for d in devices
                if torch.device(d).type == "cuda"] if devices[0].startswith("cuda") else []
        plan = plan_device_map(self.model_class, config, len(devices), dtype, min(free) if free else None)
        device_map = {name: devices[i] for name, i in plan.items()}
        offload = tempfile.mkdtemp(prefix="kscale-offload-") if "disk" in devices else None
        return cls.from_pretrained(info.path, dtype=dtype, attn_implementation=mspec.attn_implementation,
                                   device_map=device_map, offload_folder=offload, **common)

    def processor_kwargs(self, mspec: ModelOptions) -> dict:
        return {}

    def load_image_processor(self, path: str, common: dict, mspec: ModelOptions) -> Any:
        """The checkpoint's image processor (``AutoImageProcessor``; Llama 4 uses kscale's own, no torchvision)."""
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, **common, **self.processor_kwargs(mspec))

    def model_facts(self, config: dict) -> dict:
        """Facts about the checkpoint (its config.json dict) that the store records with the model and
        ``kscale info`` shows: e.g. Qwen3-VL's ``deepstack_layers``. Empty for most families."""
        return {}

    def attention_facts(self, config: dict) -> dict:
        """How the language model scales q·k before its softmax (``facts.attention_scaling`` of the text
        config), recorded with the model in the store: what query-key analyses multiply by."""
        return attention_scaling(config.get("text_config") or config)

    # -- module locations (language model only)
    def decoder_layers(self, model) -> list[torch.nn.Module]:
        return list(model.model.language_model.layers)

    def key_modules(self, model) -> list[torch.nn.Module]:
        return [layer.self_attn.k_proj for layer in self.decoder_layers(model)]

    def query_modules(self, model) -> list[torch.nn.Module]:
        return [layer.self_attn.q_proj for layer in self.decoder_layers(model)]

    def value_modules(self, model) -> list[torch.nn.Module]:
        """The value projections, (B, T, Hkv*D): no family here normalises or rotates values
        (``v_proj``'s output is what attention averages; Gemma 3n's ``v_norm`` would need its own adapter)."""
        return [layer.self_attn.v_proj for layer in self.decoder_layers(model)]

    def malora_parent(self, target: str) -> str:
        """Sub-module of a decoder layer that holds MaLoRA target ``target`` (``MALORA_TARGETS``)."""
        parents = MALORA_TARGETS[self.family]
        if target not in parents:
            raise ValueError(f"Target module {target!r} is not a known projection of {self.family} "
                             f"(known: {', '.join(parents)})")
        return parents[target]

    def rotary_module(self, model) -> torch.nn.Module:
        return model.model.language_model.rotary_emb

    # -- vision tower
    pixel_keys: tuple[str, ...] = ("pixel_values",)  # the batch inputs the vision tower reads
    # image_inputs gets the images grouped by sample (a list per sample) instead of one flat list: for
    # processors that treat a sample of several images differently (LLaVA-OneVision tiles single images only)
    images_by_sample: bool = False

    def image_features(self, model, inputs: dict[str, torch.Tensor]) -> Any:
        """The vision tower's output for the pixel inputs in ``inputs``, exactly as the model's forward
        computes it (``get_image_features``); the forward takes it back as ``mm_encoder_outputs["image"]``."""
        pixels = {k: v for k, v in inputs.items() if k in self.pixel_keys}
        return model.model.get_image_features(**pixels, return_dict=True)

    # -- RoPE positions
    def position_ids(self, loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """RoPE position ids of the full (unmasked) sequences of ``inputs``, in the layout the model's
        ``position_ids`` takes: (B, T) here (1-D RoPE: 0..T-1 in every row); (R, B, T) for M-RoPE.

        Passing these explicitly keeps every token at its full-sequence position when tokens are later
        masked out as keys (``kscale.bias.dropping``)."""
        ids_BT = inputs["input_ids"]
        B, T = ids_BT.shape
        return torch.arange(T, device=ids_BT.device).view(1, T).expand(B, T)

    # -- token ids
    def image_token_id(self, config) -> int:
        raise NotImplementedError

    def video_token_id(self, config) -> int | None:
        return None

    def special_ids(self, loaded: LoadedModel) -> set[int]:
        ids = set(loaded.tokenizer.all_special_ids) - {loaded.tokenizer.unk_token_id}
        return ids - {self.image_token_id(loaded.model.config), self.video_token_id(loaded.model.config)}

    def wrapper_ids(self, config) -> set[int]:
        """Ids that wrap or separate media blocks (vision start/end, image newlines, ...), read from the
        checkpoint's config: always tagged ``special``, even where a processor counts them as image tokens."""
        return set()

    def mm_token_ids(self, config) -> dict[int, list[int]]:
        """The ids transformers' processor marks in ``mm_token_type_ids`` (``ProcessorMixin``'s
        ``image_token_ids`` / ``video_token_ids``): {1: image ids, 2: video ids}, from the checkpoint's config."""
        vid = self.video_token_id(config)
        return {1: [self.image_token_id(config)], 2: [] if vid is None else [vid]}

    def mm_token_type_ids(self, input_ids_BT: torch.Tensor, config) -> torch.Tensor:
        """transformers' multimodal contract per token (``create_mm_token_type_ids``): 0 text, 1 image, 2 video.
        The tags of :meth:`tag` are these (wrapper tokens aside); Qwen's forward reads them for M-RoPE."""
        mm_BT = torch.zeros(input_ids_BT.shape, dtype=torch.int32)
        for code, ids in self.mm_token_ids(config).items():
            if ids:
                mm_BT[torch.isin(input_ids_BT, torch.tensor(ids, dtype=input_ids_BT.dtype))] = code
        return mm_BT

    # -- inputs
    def image_inputs(self, loaded: LoadedModel, images: list) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Pixel tensors for the images of a batch and, per image, what :meth:`image_block` needs: the number
        of LM tokens it becomes (or a family's richer layout, e.g. LLaVA-NeXT's tile grid)."""
        raise NotImplementedError

    def image_block(self, loaded: LoadedModel, n_tokens: Any) -> list[int] | tuple[list[int], list[int]]:
        """The token ids of one image (``n_tokens``: what :meth:`image_inputs` gave for it). A family whose
        block holds positions the token-id rule cannot tag (LLaVA-NeXT's newline features carry the image
        token id; Idefics3's row markers) returns ``(ids, tags)``, a modality code per position."""
        raise NotImplementedError

    def extra_inputs(self, input_ids_BT: torch.Tensor, config) -> dict[str, torch.Tensor]:
        return {}

    def video_inputs(self, loaded: LoadedModel, videos: list[Video]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel tensors for the videos of a batch and the number of LM tokens each becomes (families that
        take video override this and :meth:`video_block`)."""
        raise ValueError(f"model family {self.family!r} does not take video input")

    def video_block(self, loaded: LoadedModel, video: Video, n_tokens: int) -> tuple[list[int], list[int]]:
        """The token ids of one video and, per id, the frame it belongs to (-1 for wrapper tokens); a family
        whose block holds positions the token-id rule cannot tag (LLaVA-OneVision's closing newline feature
        carries the video token id) adds a modality code per position as a third list."""
        raise ValueError(f"model family {self.family!r} does not take video input")

    def build_batch(self, loaded: LoadedModel, images: list, texts: list[str],
                    answers: list[str] | None = None) -> Batch:
        """Shorthand for :meth:`batch` of one-image (or text-only) samples: ``images[i]`` is a PIL image or
        None, ``answers`` (optional) the assistant turn of each."""
        return self.batch(loaded, [Sample.simple(im, t, a) for im, t, a in
                                   zip(images, texts, answers or [None] * len(texts))])

    def batch(self, loaded: LoadedModel, samples: list[Sample], with_answers: bool = True) -> Batch:
        """Tokenise samples (see :mod:`kscale.models.inputs`) into one right-padded batch.

        Media placeholders are expanded to the processor's token count here, so the count is known
        exactly (no string re-tokenisation); each image's tokens carry its index in ``Sample.images``.
        """
        tok = loaded.tokenizer
        if not with_answers:
            samples = [s.without_answers() for s in samples]
        plans = [self._plan_sample(loaded, s) for s in samples]
        # The model fills image (video) tokens with the vision tower's features in sequence order, so the
        # pixels go in the order the media are rendered, not the order of Sample.images.
        named = [[m for m in plan if isinstance(m, Media)] for plan in plans]
        by_sample = [[s.images[m.index] for m in ms if m.kind == "image"] for s, ms in zip(samples, named)]
        images = [im for group in by_sample for im in group]
        videos = [s.videos[m.index] for s, ms in zip(samples, named) for m in ms if m.kind == "video"]
        pix, counts = self.image_inputs(loaded, by_sample if self.images_by_sample else images) if images else ({}, [])
        vpix, vcounts = self.video_inputs(loaded, videos) if videos else ({}, [])
        counts_it, vcounts_it = iter(counts), iter(vcounts)
        rendered, n_img = [], []
        for s, plan in zip(samples, plans):
            out = _Rendered()
            for item in plan:
                if not isinstance(item, Media):
                    out.add(item[0], answer=item[1])
                elif item.kind == "image":
                    n = next(counts_it)
                    block = self.image_block(loaded, n)
                    ids, tags = block if isinstance(block, tuple) else (block, None)
                    out.add(ids, image=item.index, tags=tags)
                    out.n_image += n if tags is None else tags.count(IMAGE)
                else:
                    block = self.video_block(loaded, s.videos[item.index], next(vcounts_it))
                    ids, frames, tags = block if len(block) == 3 else (*block, None)
                    out.add(ids, video=item.index, frames=frames, tags=tags)
            rendered.append(out)
        B, T = len(rendered), max(len(r.ids) for r in rendered)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        answer_mask = torch.zeros((B, T), dtype=torch.bool)
        image_index = torch.full((B, T), -1, dtype=torch.int16)
        video_index = torch.full((B, T), -1, dtype=torch.int16)
        frame = torch.full((B, T), -1, dtype=torch.int32)
        block_tags = torch.full((B, T), _BY_ID, dtype=torch.int8)
        for i, r in enumerate(rendered):
            n = len(r.ids)
            input_ids[i, :n], attn[i, :n] = torch.tensor(r.ids), 1
            answer_mask[i, :n] = torch.tensor(r.answer, dtype=torch.bool)
            image_index[i, :n] = torch.tensor(r.image_index, dtype=torch.int16)
            video_index[i, :n] = torch.tensor(r.video_index, dtype=torch.int16)
            frame[i, :n] = torch.tensor(r.frame, dtype=torch.int32)
            block_tags[i, :n] = torch.tensor(r.tags, dtype=torch.int8)
        inputs = {"input_ids": input_ids, "attention_mask": attn, **pix, **vpix}
        inputs.update(self.extra_inputs(input_ids, loaded.model.config))
        modality = self.tag(loaded, input_ids, attn)
        modality = torch.where(block_tags == _BY_ID, modality, block_tags)  # tags an image block gave
        image_index[modality != IMAGE] = -1  # wrapper tokens of a block (vision start/end) are no image's
        # a video block's wrappers have frame -1; its text (Qwen3-VL's "<t seconds>") keeps its frame
        video_index[frame < 0] = -1
        times = self._frame_times(samples, video_index, frame)
        return Batch(inputs, modality, image_index, answer_mask, [r.n_image for r in rendered],
                     video_index, frame, times)

    @staticmethod
    def _frame_times(samples: list[Sample], video_index_BT: torch.Tensor, frame_BT: torch.Tensor) -> torch.Tensor | None:
        if not any(s.videos for s in samples):
            return None
        times = torch.full(frame_BT.shape, float("nan"), dtype=torch.float32)
        for b, s in enumerate(samples):
            for k, v in enumerate(s.videos):
                sel = video_index_BT[b] == k
                times[b, sel] = torch.tensor(v.timestamps, dtype=torch.float32)[frame_BT[b, sel].long()]
        return times

    def _plan_sample(self, loaded: LoadedModel, sample: Sample) -> list:
        """Through the checkpoint's chat template where the job uses it (:mod:`kscale.models.prompts`), else
        through kscale's template string (:meth:`_plan`)."""
        if loaded.prompt is not None and loaded.prompt.kind == "native":
            from kscale.models.prompts import plan_native

            return plan_native(self, loaded, sample)
        plan = self._plan(loaded.tokenizer, loaded.template, sample)
        if not any(any(self.media_text(loaded, k)) for k in ("image", "video")):
            return plan
        out: list = []
        for item in plan:  # the text the processor writes around each block, as pieces of their own
            if not isinstance(item, Media):
                out.append(item)
                continue
            before, after = self.media_text(loaded, item.kind)
            out += [(loaded.tokenizer(before, add_special_tokens=False).input_ids, False)] if before else []
            out.append(item)
            out += [(loaded.tokenizer(after, add_special_tokens=False).input_ids, False)] if after else []
        return out

    def chat_placeholder(self, loaded: LoadedModel, kind: str) -> str:
        """The text a chat template writes for one image (``kind`` image) or video, which the family's
        :meth:`image_block` / :meth:`video_block` replaces: the media token by default."""
        cfg = loaded.model.config
        tid = self.image_token_id(cfg) if kind == "image" else self.video_token_id(cfg)
        return loaded.tokenizer.convert_ids_to_tokens(tid)

    def media_text(self, loaded: LoadedModel, kind: str) -> tuple[str, str]:
        """Plain text the processor writes before and after each image (video) block, outside the block's own
        tokens (Gemma 3: ``"\\n\\n"`` each side); native prompts tokenise it with the template's text around it."""
        return "", ""

    def _plan(self, tok, template: str, sample: Sample) -> list:
        """One sample as a list of ``(token ids, is_answer)`` pieces and the :class:`Media` to expand, in order."""
        plan: list = []
        if self.add_bos and tok.bos_token_id is not None:
            plan.append(([tok.bos_token_id], False))
        for turn in sample.turns:
            if turn.role == "system":
                plan.append((tok(turn.text, add_special_tokens=False).input_ids, False))
            elif turn.role == "assistant":
                plan.append((tok(" " + turn.text, add_special_tokens=False).input_ids + [tok.eos_token_id], True))
            else:
                plan += self._plan_user(tok, template, turn.content)
        return plan

    @staticmethod
    def _plan_user(tok, template: str, content: tuple) -> list:
        """A user turn through the template (:meth:`_render_user`), each text piece tokenised on its own."""
        return [p if isinstance(p, Media) else (tok(p, add_special_tokens=False).input_ids, False)
                for p in Adapter._render_user(template, content)]

    @staticmethod
    def _render_user(template: str, content: tuple) -> list:
        """A user turn through the template as text pieces and :class:`Media` in order: ``{image}`` is the media
        that open the turn, ``{text}`` the rest (the whole turn where the template has no ``{image}``)."""
        lead = 0
        if "{image}" in template:
            while lead < len(content) and isinstance(content[lead], Media):
                lead += 1
        out: list = []
        rest = template
        while rest:
            i_img, i_txt = rest.find("{image}"), rest.find("{text}")
            cands = [(i, k) for i, k in ((i_img, "image"), (i_txt, "text")) if i >= 0]
            if not cands:
                out.append(rest)
                break
            i, k = min(cands)
            if i > 0:
                out.append(rest[:i])
            out += list(content[:lead] if k == "image" else content[lead:])
            rest = rest[i + len(k) + 2:]
        return out

    def tag(self, loaded: LoadedModel, input_ids_BT: torch.Tensor, attn_BT: torch.Tensor) -> torch.Tensor:
        """Modality tag of every token (PAD where attention_mask is 0): image and video where the processor's
        contract (:meth:`mm_token_type_ids`) says 1 and 2, special for the tokenizer's special tokens (not the
        unknown token) and the media wrappers (:meth:`wrapper_ids`), text otherwise."""
        cfg = loaded.model.config
        modality = torch.full(input_ids_BT.shape, TEXT, dtype=torch.int8)
        special = torch.tensor(sorted(self.special_ids(loaded)), dtype=input_ids_BT.dtype)
        modality[torch.isin(input_ids_BT, special)] = SPECIAL
        mm_BT = self.mm_token_type_ids(input_ids_BT, cfg)
        modality[mm_BT == 1] = IMAGE
        modality[mm_BT == 2] = VIDEO
        wrappers = torch.tensor(sorted(self.wrapper_ids(cfg)), dtype=input_ids_BT.dtype)
        modality[torch.isin(input_ids_BT, wrappers)] = SPECIAL
        modality[attn_BT == 0] = PAD
        return modality


_BY_ID = -2  # no tag of its own: the token-id rule (Adapter.tag) decides


@dataclass
class _Rendered:
    """One sample's tokens as rendered, with per-token facts (lists, same length as ``ids``)."""

    ids: list[int] = field(default_factory=list)
    image_index: list[int] = field(default_factory=list)
    video_index: list[int] = field(default_factory=list)
    frame: list[int] = field(default_factory=list)
    answer: list[bool] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)  # a block's own tag per token, _BY_ID for the token-id rule
    n_image: int = 0  # image tokens by the processor's formula

    def add(self, ids: list[int], image: int = -1, video: int = -1, frames: list[int] | None = None,
            answer: bool = False, tags: list[int] | None = None) -> None:
        assert tags is None or len(tags) == len(ids)
        self.tags += tags if tags is not None else [_BY_ID] * len(ids)
        self.ids += ids
        self.image_index += [image] * len(ids)
        self.video_index += [video] * len(ids)
        self.frame += frames if frames is not None else [-1] * len(ids)
        self.answer += [answer] * len(ids)


ADAPTERS: dict[str, type[Adapter]] = {}
CAPABILITIES = ("keys", "queries", "attention", "video", "train", "bias")


def family_rows() -> list[dict]:
    """One row per registered family: its transformers class, what it supports, its MaLoRA targets."""
    return [{"family": f, "model_class": a.model_class, "supports": {c: c in a.supports for c in CAPABILITIES},
             "malora_targets": list(MALORA_TARGETS[f])} for f, a in ADAPTERS.items()]


def families_table() -> str:
    """``family_rows`` as the markdown table ``kscale models`` prints and the README shows."""
    head = ["family", "transformers class", *CAPABILITIES, "MaLoRA targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in family_rows():
        marks = ["yes" if r["supports"][c] else "-" for c in CAPABILITIES]
        lines.append("| " + " | ".join([f"`{r['family']}`", f"`{r['model_class']}`", *marks,
                                          ", ".join(r["malora_targets"])]) + " |")
    return "\n".join(lines)


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.family] = cls
    return cls


from kscale.models import llava as _llava  # noqa: E402,F401  (registers the adapters)
from kscale.models import qwen2_5_vl as _qwen  # noqa: E402,F401
from kscale.models import llava_next as _llava_next  # noqa: E402,F401
from kscale.models import llava_onevision as _llava_onevision  # noqa: E402,F401
from kscale.models import idefics3 as _idefics3  # noqa: E402,F401
from kscale.models import paligemma as _paligemma  # noqa: E402,F401
from kscale.models import internvl as _internvl  # noqa: E402,F401
from kscale.models import gemma3 as _gemma3  # noqa: E402,F401
from kscale.models import qwen2_vl as _qwen2  # noqa: E402,F401
from kscale.models import qwen3_vl as _qwen3  # noqa: E402,F401
from kscale.models import qwen3_vl_moe as _qwen3_moe  # noqa: E402,F401
from kscale.models import llama4 as _llama4  # noqa: E402,F401
