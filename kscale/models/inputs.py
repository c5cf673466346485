"""What one sample is when it reaches a model: the interface between data sources and family adapters.

A data source turns a row into a :class:`kscale.data.records.Record`; ``Record.sample()`` gives its
:class:`Sample`; a family's :meth:`kscale.models.registry.Adapter.batch` turns a list of samples into a
padded :class:`kscale.models.registry.Batch`. Nothing in between looks inside a sample.

A sample is a conversation (``turns``) plus the media it names:

- ``images[k]`` is a PIL image; ``videos[k]`` a :class:`Video` (frames, their timestamps);
- each :class:`Turn` has a ``role`` (``system``, ``user`` or ``assistant``) and ``content``, a tuple of
  parts in reading order: a ``str`` (text) or a :class:`Media` (``Media("image", k)`` / ``Media("video", k)``,
  the k-th image / video of the sample). Sources place media where the text names them (MMMU's
  ``<image 1>``, LLaVA's ``<image>``); without such placeholders every image comes first;
- every ``assistant`` turn is an answer span: its tokens are ``Batch.answer_mask_BT`` (the training loss,
  the bias stage's answer scores). Extraction passes ``with_answers=False`` to leave them out.

The tags an adapter returns follow the sample: the tokens of ``images[k]`` carry ``image_index`` k (0-based,
in the order of ``images``, whatever order they appear in the text), the tokens of ``videos[k]`` carry
``video_index`` k, with their frame index and timestamp.

A checkpoint's own chat template renders samples where it has one (:mod:`kscale.models.prompts`).
Rendering without a chat template (tiny test models, ``model.prompt_template``): the adapter's template
(``"{image}{text}"`` style) renders each user turn; ``{image}`` takes the media parts that open the turn,
``{text}`` the rest in order (media met later become their token blocks in place). An assistant turn is
``" " + text`` and the end-of-sequence token. A system turn is its text, before the first user turn. This
keeps a one-image, one-question sample token for token what kscale built before samples existed.

Legend: F frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Media:
    """A reference to the ``index``-th image or video of the sample."""

    kind: Literal["image", "video"]
    index: int


Part = str | Media


@dataclass(frozen=True)
class Turn:
    role: Literal["system", "user", "assistant"]
    content: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role {self.role!r} is not one of {', '.join(ROLES)}")

    @property
    def text(self) -> str:
        """The turn's text parts joined (media left out)."""
        return "".join(p for p in self.content if isinstance(p, str))


@dataclass
class Video:
    """Frames of one video as PIL images, with the time (seconds) of each frame in the source."""

    frames: list[Any]  # F PIL images
    timestamps: list[float]  # F seconds
    fps: float | None = None  # the sampling rate the frames were taken at (None: as given, e.g. a folder)

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.timestamps):
            raise ValueError(f"video of {len(self.frames)} frames has {len(self.timestamps)} timestamps")


@dataclass
class Sample:
    turns: tuple[Turn, ...]
    images: list[Any] = field(default_factory=list)  # PIL images
    videos: list[Video] = field(default_factory=list)

    def __post_init__(self) -> None:
        for t in self.turns:
            for p in t.content:
                if isinstance(p, Media):
                    n = len(self.images) if p.kind == "image" else len(self.videos)
                    if not 0 <= p.index < n:
                        raise ValueError(f"sample names {p.kind} {p.index} but has {n}")

    @classmethod
    def simple(cls, image: Any | None, text: str, answer: str | None = None) -> "Sample":
        """One user turn (the image first, then the text) and, given one, the answer as the assistant turn:
        the (image, text, answer) record every source gave before conversations."""
        user = Turn("user", ((Media("image", 0),) if image is not None else ()) + (text,))
        turns = (user,) if answer is None else (user, Turn("assistant", (answer,)))
        return cls(turns, [image] if image is not None else [])

    def without_answers(self) -> "Sample":
        """The sample up to its first assistant turn (the prompt that extraction and scoring read)."""
        cut = next((i for i, t in enumerate(self.turns) if t.role == "assistant"), len(self.turns))
        return Sample(self.turns[:cut], self.images, self.videos)
