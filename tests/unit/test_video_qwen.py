"""Video input of the Qwen-VL families against transformers' own processors and the model.

There is no CPU torchvision: ``Qwen2VLVideoProcessor`` cannot be imported, ``Qwen3VLVideoProcessor`` can but
resizes, converts and normalises with torchvision functions. The reference here is the family's processor
class (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``: placeholder expansion, Qwen3's
``<t seconds>`` text, ``mm_token_type_ids``, ``second_per_grid_ts``) with ``Qwen3VLVideoProcessor`` set to
the family's patch/merge/temporal sizes and mean/std, run with ``do_resize=False`` on frames already at a
size the resize rule keeps (so the torchvision resize is not needed) and torchvision's ``normalize``
formula ((x - mean) / std per channel) standing in for the missing function. Its ``patchify`` is the same
code as Qwen2-VL's video processor. On top: the model's forward takes the pixels, the token count is
``video_grid_thw.prod() // merge**2``, and every video token's frame, time and tag.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from kscale.models import IMAGE, SPECIAL, TEXT, VIDEO, load_model
from kscale.models.debug import debug_model_dir
from kscale.models.inputs import Media, Sample, Turn, Video
from kscale.spec import ModelSpec
from tests.unit.test_families_qwen import PROCESSORS, processor_tags

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens ?<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return load_model(ModelSpec(path=debug_model_dir(request.param), device="cpu", dtype="float32"))


def _video(n: int, side: int, seed: int = 0, fps: float = 2.0) -> Video:
    rng = np.random.default_rng(seed)
    frames = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    return Video(frames, [i / fps for i in range(n)], fps=fps)


def _side(lm) -> int:
    return 2 * lm.image_processor.patch_size * lm.image_processor.merge_size  # kept by every resize rule here


def _reference(lm, monkeypatch):
    import transformers
    import transformers.image_processing_backends as backends
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    def normalize(x, mean, std, inplace=False):  # torchvision.transforms.v2.functional.normalize's formula
        return (x - torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)) / torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)

    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize), raising=False)
    ip = lm.image_processor
    vp = Qwen3VLVideoProcessor(patch_size=ip.patch_size, merge_size=ip.merge_size,
                               temporal_patch_size=ip.temporal_patch_size, image_mean=ip.image_mean,
                               image_std=ip.image_std, size=dict(ip.size))

    class _Proc(getattr(transformers, PROCESSORS[lm.info.family])):
        def check_argument_for_proper_class(self, name, arg):  # the video class check needs torchvision
            return None

    return _Proc(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(lm.info.path), video_processor=vp)


@pytest.mark.parametrize("n_frames", [4, 3])  # 3: padded to the temporal patch by repeating the last frame
def test_video_inputs_equal_the_family_processor(lm, monkeypatch, n_frames) -> None:
    from transformers.video_utils import VideoMetadata

    v = _video(n_frames, _side(lm))
    ours = lm.adapter.batch(lm, [Sample((Turn("user", (Media("video", 0), "what happens ?")),), videos=[v])])
    proc = _reference(lm, monkeypatch)
    md = VideoMetadata(total_num_frames=n_frames, fps=v.fps, frames_indices=list(range(n_frames)))
    theirs = proc(text=[PROMPT], videos=[np.stack([np.asarray(f) for f in v.frames])], video_metadata=[md],
                  do_resize=False, do_sample_frames=False, do_convert_rgb=False, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        assert torch.equal(ours.inputs[k].to(theirs[k].dtype), theirs[k]), k
    torch.testing.assert_close(ours.inputs["pixel_values_videos"], theirs["pixel_values_videos"], atol=1e-5, rtol=0)
    if "second_per_grid_ts" in theirs:
        torch.testing.assert_close(ours.inputs["second_per_grid_ts"].float(),
                                   torch.as_tensor(theirs["second_per_grid_ts"]).float())
    else:
        assert "second_per_grid_ts" not in ours.inputs
    assert torch.equal(ours.modality_BT, processor_tags(proc, theirs))
    merge = lm.image_processor.merge_size
    assert int((ours.modality_BT == VIDEO).sum()) == int(theirs["video_grid_thw"].prod()) // merge ** 2


def test_video_frames_times_tags_and_the_forward(lm) -> None:
    v = _video(5, _side(lm), fps=4.0)  # 3 temporal patches (frames 0-1, 2-3, 4+4)
    turns = (Turn("user", (Media("image", 0), "and", Media("video", 0), "what happens ?")),)
    img = Image.fromarray(np.full((56, 56, 3), 200, np.uint8))
    b = lm.adapter.batch(lm, [Sample(turns, [img], [v])])
    with torch.no_grad():
        logits = lm.model(**b.inputs).logits  # the forward takes the pixels and the counts
    assert torch.isfinite(logits).all()
    vid = b.modality_BT[0] == VIDEO
    grid = b.inputs["video_grid_thw"][0]
    merge = lm.image_processor.merge_size
    assert int(vid.sum()) == int(grid.prod()) // merge ** 2 and int(grid[0]) == 3
    per = int(vid.sum()) // 3
    assert b.frame_BT[0][vid].tolist() == [0] * per + [2] * per + [4] * per  # each patch's first frame
    assert torch.equal(b.time_BT[0][vid], torch.tensor(v.timestamps)[b.frame_BT[0][vid].long()])
    assert (b.video_index_BT[0][vid] == 0).all() and (b.image_index_BT[0][vid] == -1).all()
    outside = b.video_index_BT[0] < 0
    assert (b.frame_BT[0][outside] == -1).all() and b.time_BT[0][outside].isnan().all()
    assert (b.modality_BT[0][b.frame_BT[0] >= 0] != SPECIAL).all()  # wrappers carry no frame
    assert int((b.modality_BT[0] == IMAGE).sum()) == b.n_image_tokens[0] > 0
    pos = lm.adapter.position_ids(lm, b.inputs)
    assert (pos[0, 0][vid].unique().numel() == 3)  # the temporal row steps with the patches
    timed = (b.modality_BT[0] == TEXT) & (b.frame_BT[0] >= 0)  # Qwen3-VL's "<t seconds>" text
    if lm.info.family.startswith("qwen3"):
        tok = lm.tokenizer
        ids = b.inputs["input_ids"][0]
        assert sorted(set(b.frame_BT[0][timed].tolist())) == [0, 2, 4]
        texts = {f: tok.decode(ids[timed & (b.frame_BT[0] == f)]) for f in (0, 2, 4)}
        assert [t.replace(" ", "") for t in texts.values()] == ["<0.1seconds>", "<0.6seconds>", "<1.0seconds>"]
    else:
        assert not timed.any()

