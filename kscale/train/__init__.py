"""Training stage: MaLoRA adapters (the library :mod:`kscale.adapters`, also importable as
``kscale.train.malora``), the LM + key-alignment objective (:mod:`kscale.train.objective`), the DeepSpeed loop (:mod:`kscale.train.engine`) and the one public entry
:func:`kscale.train.run.run_train`."""
