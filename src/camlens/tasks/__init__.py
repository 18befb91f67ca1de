"""Batch tasks on the pipeline: ``explain``, ``evaluate`` and the audit's map pass.

Each task supplies ``settings()``, a worker (``load``/``process``: the only place that runs the
model) and ``fold(records)`` (pure); see ``camlens.pipeline.Task``.
"""
