"""``run_extract(spec)``: prepare the store, plan shards, skip committed ones, run the rest.

The store is claimed (:mod:`kscale.output`: an exclusive lock, then the policy) before anything is
written and released at the end; a second run on it is refused (``OutputLocked``, naming the holder).
Store policy (``output.if_exists``): ``resume`` continues a store written by the
same spec (its fingerprint must match: a different spec is an error, never a silent mix), ``fail``
refuses an existing store, ``overwrite`` replaces it; a store extracted with an adapter
(``extract.adapter``, recorded with the hash of its files in the root attributes) resumes only with the same
adapter files (:func:`check_adapter`). A directory that is not a kscale store (its root
attributes say ``format: kscale-keys``) is never deleted or written into.
"""

from __future__ import annotations

import time
from pathlib import Path

import zarr

from kscale import __version__
from kscale.data import open_source, plan_shards
from kscale.data.lineindex import index_dir
from kscale.data.identity import data_identity
from kscale.models.registry import MODALITY_CODES, get_adapter, read_config_json
from kscale.output import OutputError, OutputKind, claim_output
from kscale.results import ExtractResult
from kscale.spec import JobSpec, to_dict
from kscale.spec.cluster import redact_env
from kscale.store.index import write_index
from kscale.store.layout import (STORE_FORMAT, STORE_VERSION, VECTOR_DIMS, VECTOR_GROUPS, is_store, marker_names,
                                 token_fields)
from kscale.store.writer import sweep_staging


StoreExistsError = OutputError  # the store policy's refusals (kscale.output: foreign, exists, locked)


def _versions() -> dict:
    import numpy
    import torch
    import transformers

    return {"kscale": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__}


def root_attrs(spec: JobSpec, info, processor_settings: dict, layers: list[int], heads: list[int], n_samples: int,
               shards: int) -> dict:
    config = read_config_json(spec.model)[0]
    adapter = get_adapter(info.family)
    return {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "model": {"path": spec.model.path, "resolved_path": info.path, "family": info.family,
                  "model_type": info.model_type, "config_hash": info.config_hash, "revision": spec.model.revision,
                  "num_layers": info.num_layers, "num_heads": info.num_heads, "num_kv_heads": info.num_kv_heads,
                  "dtype": spec.model.dtype, "attn_implementation": spec.model.attn_implementation,
                  "config": config,  # makes the store self-contained (post-RoPE rebuild)
                  **adapter.attention_facts(config),  # attention_scaling (q·k multiplier)
                  **adapter.model_facts(config),  # e.g. Qwen3-VL's deepstack_layers
                  "tokens_revision": adapter.tokens_revision},
        "processor": processor_settings,
        "prompt_template": _prompt_template(spec, info),  # which template made the tokens: native, override, built-in
        "spec": redact_env(to_dict(spec)), "spec_fingerprint": spec.fingerprint(), "data": data_identity(spec.data),
        "versions": _versions(),
        "dims": {"keys": ["layer", "token", "kv_head", "head_dim"], "tokens": ["token", "field"],
                 **{VECTOR_GROUPS[k]: list(VECTOR_DIMS[k]) for k in spec.extract.kinds if k != "k"}},
        "vectors": list(spec.extract.kinds),  # q, k, v: what the store holds (layout.store_vectors)
        "layers": layers, "heads": heads, "head_dim": info.head_dim, "key_dtype": spec.extract.key_dtype,
        "key_space": "pre_rope", "key_source": adapter.key_source,
        "rope_rows": adapter.rope_rows,
        "token_fields": list(token_fields(adapter.rope_rows, video=True)),
        "modality_codes": dict(MODALITY_CODES),
        "plan": {"n_samples": n_samples, "shard_size": spec.data.shard_size, "n_shards": shards},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"adapter": _adapter_identity(spec)} if spec.extract.adapter else {}),
    }


def _adapter_identity(spec: JobSpec) -> dict | None:
    """What the store records of ``extract.adapter`` (:func:`kscale.adapters.adapter_identity`), None without."""
    from kscale.adapters import adapter_identity  # torch: only when an adapter is named

    return adapter_identity(spec.extract.adapter) if spec.extract.adapter else None


def check_adapter(store: str, recorded: dict | None, now: dict | None) -> None:
    """Resume only with the adapter the store was extracted with: same kind, merge and file hashes (the spec
    fingerprint already covers the path; this catches an adapter rewritten in place, e.g. retrained)."""
    def key(a: dict | None) -> tuple | None:
        return None if a is None else (a.get("kind"), bool(a.get("merge")), a.get("fingerprint"))

    def said(a: dict | None) -> str:
        return "no adapter" if a is None else (f"{a.get('kind')} adapter {a.get('path')!r}"
                                               f"{' (merged)' if a.get('merge') else ''} (files {a.get('fingerprint')})")

    if key(recorded) != key(now):
        raise StoreExistsError(f"extract.adapter: store {store!r} was extracted with {said(recorded)}; this job "
                               f"applies {said(now)}: resuming would mix keys of two models. Restore the adapter, "
                               "or write to another path (or output.if_exists: overwrite)")


def check_tokens_revision(store: str, model: dict, adapter) -> None:
    """Resume only where this kscale renders a family's samples into the tokens the store's shards hold
    (``Adapter.tokens_revision``; stores from before the attribute are revision 1)."""
    recorded = model.get("tokens_revision", 1)
    if recorded != adapter.tokens_revision:
        raise StoreExistsError(
            f"model.tokens_revision: store {store!r} holds {adapter.family} tokens of revision {recorded}; this "
            f"kscale renders revision {adapter.tokens_revision} (docs/models.md, footnote 1): resuming would mix "
            "two tokenisations in one store. Finish it with the kscale that started it, or write to another path "
            "(or output.if_exists: overwrite)")


def store_marker(path: Path) -> dict | None:
    """The root attributes of a kscale key store (its kind marker), None for anything else."""
    return dict(zarr.open_group(str(path), mode="r").attrs) if is_store(path) else None


STORE_KIND = OutputKind("store", store_marker)


def claim_store(spec, attrs_fn):
    """Lock the output store, then create, check or overwrite it per ``output.if_exists`` (a context)."""

    def create(tmp: Path) -> None:
        zarr.open_group(str(tmp), mode="w").attrs.update(attrs_fn())
        (tmp / "shards").mkdir()

    return claim_output(spec.output.path, spec.output.if_exists, STORE_KIND, spec.fingerprint(), create,
                        data=data_identity(spec.data), spec=to_dict(spec))


def nothing_to_do(spec) -> bool:
    """True when the store exists for this very spec and every planned shard is committed (a rerun)."""
    path = Path(spec.output.path).expanduser()
    if spec.output.if_exists != "resume" or not is_store(path):
        return False
    if dict(zarr.open_group(str(path), mode="r").attrs).get("spec_fingerprint") != spec.fingerprint():
        return False
    plan = plan_shards(len(open_source(spec.data, index_dir(spec.output.path), plan=True)), spec.data.shard_size)
    done = set(marker_names(path))
    return len(done) >= len(plan) and all(s.name in done for s in plan)  # the plan is lazy: no set of it


WORKER_MODULE = "kscale.extract.worker"  # the unit of work the shard pool runs (setup, run_shard)


def stage_entry(spec: JobSpec, ctx) -> ExtractResult:
    """The stage table's entry (``kscale.spec.STAGES``): a rerun of a finished job is reported without
    starting Ray; otherwise the shards run on ``ctx``'s executor."""
    if nothing_to_do(spec):
        from kscale.executors.local import LocalExecutor

        return run_extract(spec, LocalExecutor(WORKER_MODULE, ctx.show_bar))
    with ctx.maybe_ray(spec):
        return run_extract(spec, ctx.executor(spec, WORKER_MODULE))


def run_extract(spec: JobSpec, executor) -> ExtractResult:
    """Extract keys for every uncommitted shard through ``executor``; return the job summary."""
    from kscale.models import read_model_config, resolve_layers
    from kscale.extract.worker import resolve_heads

    info = read_model_config(spec.model)
    adapter = get_adapter(info.family)
    _check_supported(spec, adapter)
    n = len(open_source(spec.data, index_dir(spec.output.path), plan=True))  # builds the data indexes once
    shards = plan_shards(n, spec.data.shard_size)
    layers = resolve_layers(spec.extract.layers, info.num_layers, "extract.layers")
    heads = resolve_heads(spec.extract.heads, info.num_kv_heads)

    def attrs():
        settings = _processor_settings(spec, info, adapter)
        return root_attrs(spec, info, settings, layers, heads, n, len(shards))

    with claim_store(spec, attrs) as path:
        store = str(path)
        found = dict(zarr.open_group(store, mode="r").attrs)
        version = found.get("version")
        if version != STORE_VERSION:  # resume never mixes layouts; old stores stay readable
            raise StoreExistsError(f"output.path: store {store!r} has format version {version}; this kscale "
                                   f"writes version {STORE_VERSION}: choose another path or output.if_exists: "
                                   "overwrite")
        check_adapter(store, found.get("adapter"), _adapter_identity(spec))
        check_tokens_revision(store, found.get("model") or {}, adapter)
        sweep_staging(store)  # a killed run's staging folders and marker temp files (the lock is ours)
        done = set(marker_names(store))
        todo = [s for s in shards if s.name not in done]
        try:
            result = executor.run(spec, todo, skipped=len(shards) - len(todo), progress_dir=store)
        finally:
            write_index(store)  # the committed shards, whatever happened to the others (lock still held)
    return ExtractResult(store=store, **ExtractResult.progress_fields({**result, "shards_total": len(shards)}))


def _check_supported(spec: JobSpec, adapter) -> None:
    """Refuse what the family does not offer (``Adapter.supports``) before any work: videos for a family
    without video; attention statistics or stored queries for Llama 4 (its NoPE layers scale queries by
    position and its RoPE layers attend in chunks, neither of which kscale's statistics model)."""
    attn = spec.extract.attention
    for field, on, needs in (("extract.attention.enabled", attn.enabled, "attention"),
                             ("extract.attention.store_queries", attn.store_queries, "queries")):
        if on and needs not in adapter.supports:
            raise ValueError(f"{field}: model family {adapter.family!r} does not support {needs} "
                             f"(it supports: {', '.join(adapter.supports)})")
    if "q" in spec.extract.vectors and "queries" not in adapter.supports:
        raise ValueError(f"extract.vectors: model family {adapter.family!r} does not support queries "
                         f"(it supports: {', '.join(adapter.supports)})")
    if getattr(spec.data, "video_field", None) and "video" not in adapter.supports:
        raise ValueError(f"data.video_field: {spec.data.video_field!r} names videos, but model family "
                         f"{adapter.family!r} does not take video (see kscale models)")


def _prompt_template(spec: JobSpec, info) -> dict:
    """The prompt the workers render with (``Adapter.prompt_template``, from the checkpoint's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.path, revision=spec.model.revision,
                                        trust_remote_code=spec.model.trust_remote_code)
    return get_adapter(info.family).prompt_template(spec.model, info, tok).attrs()


def _processor_settings(spec: JobSpec, info, adapter) -> dict:
    common = dict(revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code)
    proc = adapter.load_image_processor(info.path, common, spec.model)
    return {k: v for k, v in proc.to_dict().items() if not k.startswith("_")}
