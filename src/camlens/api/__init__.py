"""The Python front end: one function per job, each taking a model spec or a loaded model.

``explain`` (in memory) and ``run_explain`` (into a folder), ``evaluate``, ``audit``, ``train``,
``factorize`` (concepts, in memory) and ``concepts`` (into a folder).
Each is loaded on first use, so that importing one job does not import the others.
"""

from camlens.lazy import lazy_exports

__all__ = [
    "DenseSettings",
    "audit",
    "concepts",
    "evaluate",
    "explain",
    "explain_dense",
    "factorize",
    "run_explain",
    "save_explanation",
    "train",
]

__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "audit": "camlens.api.auditing",
        "concepts": "camlens.api.factorizing",
        "factorize": "camlens.api.factorizing",
        "evaluate": "camlens.api.evaluating",
        "explain": "camlens.api.explaining",
        "explain_dense": "camlens.api.explaining",
        "DenseSettings": "camlens.api.explaining",
        "run_explain": "camlens.api.explaining",
        "save_explanation": "camlens.api.explaining",
        "train": "camlens.api.training",
    },
)
