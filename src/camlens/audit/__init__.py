"""Data-set level shortcut search: find, group, confirm and report (``camlens audit``).

A "horse" classifier that reads a source tag in the corner (Lapuschkin et al. 2019) or an
x-ray model that reads a metal token (Zech et al. 2018) shows it on every image, but nobody
looks at ten thousand heat maps. ``run_audit`` streams the maps of a whole data set, finds
regions that are hot on many images of a class at the same place, groups each class's maps
into strategies (SpRAy), and proves or rejects each candidate with counterfactuals (paste it
onto other images, erase it) against random regions of the same size.

Example:
    >>> from camlens.audit import run_audit
    >>> result = run_audit("runs/shapes", "shapes/images", "audit_out")
    >>> result["summary"][0]
    'Class circle depends on a fixed region in the upper left corner of the image ...'
"""

from camlens.audit.confirm import Confirmation, ConfirmRule, confirm_hotspot
from camlens.audit.core import AuditSettings, describe_place, run_audit
from camlens.audit.find import Hotspot, MapAccumulator, find_hotspots, heat_share
from camlens.audit.spray import Reservoir, eigengap_cluster_count, spectral_relevance_analysis

__all__ = [
    "AuditSettings",
    "ConfirmRule",
    "Confirmation",
    "Hotspot",
    "MapAccumulator",
    "Reservoir",
    "confirm_hotspot",
    "describe_place",
    "eigengap_cluster_count",
    "find_hotspots",
    "heat_share",
    "run_audit",
    "spectral_relevance_analysis",
]
