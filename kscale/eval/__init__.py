"""The eval stage (``kind: eval``): lmms-eval benchmarks of a base model and its adapters, with and without
the image.

- :mod:`kscale.eval.lmms_model`: :class:`KscaleLMM`, kscale's model loading and batching as an lmms-eval
  model (imports lmms-eval: the optional ``eval`` extra);
- :mod:`kscale.eval.variants`: base / MaLoRA (gated or merged) / PEFT LoRA applied to a fresh model;
- :mod:`kscale.eval.table`: lmms-eval's results -> one row per (variant, task, metric) with the blind
  score and the multimodal gain;
- :mod:`kscale.eval.run`: the stage entry (``kscale.spec.STAGES["eval"]``) and the run directory.
"""
