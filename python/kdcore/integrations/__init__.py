"""Hugging Face integrations (the ``hf`` extra: transformers, trl, datasets).

- :mod:`kdcore.integrations.trl`: ``DistillationTrainer``, TRL's on-policy
  distillation trainer with kdcore's fused loss and span weights.
- :mod:`kdcore.integrations.transformers`: ``KDTrainer``, a
  ``transformers.Trainer`` for off-policy distillation on encoded trajectories.

Importing this package imports nothing optional; importing either module
without the extra raises :class:`kdcore._extras.MissingExtraError` naming
``pip install "kdcore[hf]"``. See docs/integrations.md.
"""
