"""Data-set level shortcut search, the analysis behind ``camlens audit``: find, group, confirm.

A "horse" classifier that reads a source tag in the corner (Lapuschkin et al. 2019) or an
x-ray model that reads a metal token (Zech et al. 2018) shows it on every image, but nobody
looks at ten thousand heat maps. The audit folds the maps of a whole data set into per-class
statistics (``find``), finds regions that are hot on many images of a class at the same place
and small patterns that recur at varying places (``moving``),
groups each class's maps into strategies (``spray``: SpRAy), and proves or rejects each
candidate with counterfactuals (``confirm``: paste it onto other images, erase it) against
random regions of the same size. ``core`` holds the settings, the fold and the result;
``data`` which images an audit looks at.

The map pass itself is a task of the batch pipeline (``camlens.tasks.audit``) and the whole
job is ``camlens.audit`` (``camlens.api.auditing``).

Example:
    >>> import camlens
    >>> from camlens.shortcuts import describe_place
    >>> result = camlens.audit("runs/shapes", "shapes/images")  # no out_dir: nothing written
    >>> hotspot = result["classes"]["square"]["hotspots"][0]  # the squares carry a corner tag
    >>> hotspot["kind"], hotspot["box"], describe_place(hotspot["box"])
    ('fixed-region', [0.0, 0.4375, 0.4062, 1.0], 'in the lower left corner')
    >>> hotspot["tests"]["paste"]["flip_rate"], hotspot["confirmed"]  # 2 epochs: not learnt yet
    (0.05, False)
"""

from camlens.lazy import lazy_exports

_EXPORTS = {
    "Confirmation": "camlens.shortcuts.confirm",
    "ConfirmRule": "camlens.shortcuts.confirm",
    "confirm_hotspot": "camlens.shortcuts.confirm",
    "AuditFold": "camlens.shortcuts.core",
    "AuditSettings": "camlens.shortcuts.core",
    "AuditSummary": "camlens.shortcuts.core",
    "ClassFinding": "camlens.shortcuts.core",
    "build_result": "camlens.shortcuts.core",
    "describe_place": "camlens.shortcuts.core",
    "object_grid": "camlens.shortcuts.core",
    "summary_sentences": "camlens.shortcuts.core",
    "widen_box": "camlens.shortcuts.core",
    "Hotspot": "camlens.shortcuts.find",
    "MapAccumulator": "camlens.shortcuts.find",
    "find_hotspots": "camlens.shortcuts.find",
    "heat_share": "camlens.shortcuts.find",
    "Pattern": "camlens.shortcuts.moving",
    "PatternSettings": "camlens.shortcuts.moving",
    "find_patterns": "camlens.shortcuts.moving",
    "Reservoir": "camlens.shortcuts.spray",
    "eigengap_cluster_count": "camlens.shortcuts.spray",
    "spectral_relevance_analysis": "camlens.shortcuts.spray",
}

__all__ = [
    "AuditFold",
    "AuditSettings",
    "AuditSummary",
    "ClassFinding",
    "ConfirmRule",
    "Confirmation",
    "Hotspot",
    "MapAccumulator",
    "Pattern",
    "PatternSettings",
    "Reservoir",
    "build_result",
    "confirm_hotspot",
    "describe_place",
    "eigengap_cluster_count",
    "find_hotspots",
    "find_patterns",
    "heat_share",
    "object_grid",
    "spectral_relevance_analysis",
    "summary_sentences",
    "widen_box",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
