"""The seed study's job files validate against the real checkpoints' configs, and docs/reproduce.md's
dataset recipe makes a folder those jobs read.

No weights here: each test writes the real checkpoint's ``config.json`` (the fields kscale reads) into a
temporary folder and points ``model.path`` at it, so ``kscale validate`` checks layers and heads exactly
as it would on the user's machine. The recipe runs as written in the docs, with the 4 GB download
replaced by rows of the same schema.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]

# The fields of the published config.json files that kscale reads (llava-hf/llava-1.5-7b-hf,
# Qwen/Qwen2.5-VL-7B-Instruct).
CONFIGS = {
    "llava15_7b": {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                   "image_token_index": 32000,
                   "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                   "vocab_size": 32064},
                   "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                                     "patch_size": 14, "num_hidden_layers": 24}},
    "qwen25vl_7b": {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                    "vision_end_token_id": 151653},
}
LAYERS = {"llava15_7b": 32, "qwen25vl_7b": 28}


def _recipe() -> str:
    text = (REPO / "docs" / "reproduce.md").read_text()
    block = re.search(r"```python\n(from datasets import load_dataset.*?)```", text, re.S)
    assert block, "docs/reproduce.md lost its dataset recipe"
    return block.group(1)


@pytest.fixture(scope="module")
def flickr_folder(tmp_path_factory) -> Path:
    """docs/reproduce.md's recipe, run as written, on 600 rows shaped like lmms-lab/flickr30k."""
    import datasets
    from PIL import Image

    rows = {"image": [Image.new("RGB", (32, 24), (i % 255, 30, 60)) for i in range(600)],
            "caption": [[f"a photo number {i} of a dog", "another caption"] for i in range(600)],
            "sentids": [[str(i), str(i + 1)] for i in range(600)], "img_id": [str(i) for i in range(600)],
            "filename": [f"{i}.jpg" for i in range(600)]}
    fake = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
        "sentids": datasets.Sequence(datasets.Value("string")), "img_id": datasets.Value("string"),
        "filename": datasets.Value("string")}))
    out = tmp_path_factory.mktemp("flickr") / "flickr30k_500"
    code = _recipe().replace("/data/flickr30k_500", str(out))
    real = datasets.load_dataset
    datasets.load_dataset = lambda name, split: fake if (name, split) == ("lmms-lab/flickr30k", "test") else None
    try:
        exec(compile(code, "docs/reproduce.md", "exec"), {})
    finally:
        datasets.load_dataset = real
    return out


def _localised(job: str, tmp_path: Path, data_dir: Path | None = None) -> Path:
    """The job with model.path at a folder holding the real checkpoint's config.json (and data at ``data_dir``)."""
    raw = yaml.safe_load((REPO / "jobs" / job).read_text())
    if "model" in raw:
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        key = "llava15_7b" if "llava" in job else "qwen25vl_7b"
        (model / "config.json").write_text(json.dumps(CONFIGS[key]))
        raw["model"]["path"] = str(model)
    if data_dir is not None:
        raw["data"]["path"] = str(data_dir)
    out = tmp_path / job
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.mark.parametrize("model", ["llava15_7b", "qwen25vl_7b"])
def test_paper_jobs_validate_against_the_real_config(model, tmp_path, flickr_folder):
    from kscale.cli import main
    from kscale.models.registry import read_model_config
    from kscale.spec import load_spec

    extract = _localised(f"paper_{model}.yaml", tmp_path, flickr_folder)
    result = CliRunner().invoke(main, ["validate", str(extract)])
    assert result.exit_code == 0, result.output
    spec = load_spec(extract)
    assert read_model_config(spec.model).num_layers == LAYERS[model]
    assert spec.extract.layers == "all" and spec.extract.sample_tokens.image == 10
    assert spec.extract.sample_tokens.text == 10
    analyze = load_spec(_localised(f"paper_{model}_analyze.yaml", tmp_path))
    assert analyze.analyze.stores == [spec.output.path]  # step 2 reads what step 1 writes
    paper = analyze.analyze.paper_mode
    assert paper.enabled and paper.estimator == "biased" and paper.bandwidth_rule == "median"
    assert analyze.analyze.exact_subsample == 5000  # ~5,000 tokens a side, as published
    # the sampling gives ~5,000 tokens of each modality from the recipe's 500 records
    from kscale.data import open_source

    source = open_source(spec.data)
    assert len(source) * spec.extract.sample_tokens.image == 5000
    rec = source.get(0)
    assert rec.error is None and rec.image is not None and rec.text.startswith("a photo number")


def test_a_layer_beyond_the_real_model_is_refused(tmp_path, flickr_folder):
    from kscale.cli import main

    job = _localised("paper_qwen25vl_7b.yaml", tmp_path, flickr_folder)
    raw = yaml.safe_load(job.read_text())
    raw["extract"]["layers"] = [0, 28]  # Qwen2.5-VL-7B has 28 layers: 28 is out of range
    job.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code != 0 and "extract.layers[1]" in result.output and "28" in result.output
