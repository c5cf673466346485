"""Behavioural modality bias: does the model *use* the image, and which cause of text bias dominates?

A ``kind: bias`` job (``run_bias`` in :mod:`kscale.bias.run`) scores every (image, question, answer)
record for every model variant (:mod:`kscale.bias.variants`: base, base + adapter, train checkpoints):

- visual dependency: the answer with the real image vs blank / noise / swapped / no image
  (:func:`kscale.scoring.condition_image`);
- evidence conflict: the image's answer vs the text's contradicting claim;
- redundancy (data factor): answer likelihood while image or text tokens are dropped
  (:mod:`kscale.bias.dropping`);
- backbone factor: agreement with the blind answer and the blind share of the likelihood;
- objective factor: all of the above along the checkpoints of train runs.

The work unit is :mod:`kscale.bias.worker` (a plain function of (spec, shard), run by the local or Ray
executor); the answer scores come from :mod:`kscale.scoring` (shared with the training stage's
evaluation), the candidates from :mod:`kscale.bias.candidates`, the measures from
:mod:`kscale.bias.metrics`, the intervals from :mod:`kscale.bias.aggregate`, the pictures and HTML from
:mod:`kscale.bias.report`. See docs/bias.md.
"""
