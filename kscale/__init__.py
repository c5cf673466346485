"""kscale: measure and close the key-space modality gap of multimodal LLMs at cluster scale.

Data flows one way: ``job.yaml -> load_spec -> JobSpec -> executor -> stage(spec, shard) -> store``.
See README.md for the tour and docs/ for the store format and spec reference.
"""

__version__ = "0.1.0"
