"""The Python front end: one function per job, each taking a model spec or a loaded model.

``explain`` (in memory) and ``run_explain`` (into a folder), ``evaluate``, ``audit``, ``train``.
"""

from camlens.api.auditing import audit
from camlens.api.evaluating import evaluate
from camlens.api.explaining import explain, run_explain, save_explanation
from camlens.api.training import train

__all__ = ["audit", "evaluate", "explain", "run_explain", "save_explanation", "train"]
