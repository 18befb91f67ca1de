"""The audit's confirmation step: paste and erase every fixed-region hotspot
(``camlens.shortcuts.confirm``) on images drawn from the fold's SpRAy samples, and every
candidate moving pattern (``camlens.shortcuts.moving``) on the images where it was found.

This runs the model (a few hundred forward passes), so it comes after the fold of the map pass,
on the driver, and is never part of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from camlens.io.imagefolder import load_images
from camlens.models import Classifier
from camlens.shortcuts.confirm import confirm_hotspot, predict_probs
from camlens.shortcuts.core import AuditSettings, AuditSummary
from camlens.shortcuts.moving import confirm_pattern

__all__ = ["class_images", "confirm_findings"]


def confirm_findings(
    classifier: Classifier,
    summary: AuditSummary,
    settings: AuditSettings,
    *,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Run the counterfactual tests on every fixed-region hotspot of ``summary`` and store
    them in its findings' ``confirmations`` (object-position hotspots stay untested); then on
    every candidate moving pattern (``pattern_confirmations``). Bonferroni counts both.

    Every test's seed depends on its rank among the tested hotspots and ``seed``, so the same
    summary and seed give the same confirmations.
    """
    findings, reservoirs = summary.findings, summary.reservoirs
    tested = [
        (cls, i)
        for cls, finding in findings.items()
        for i, record in enumerate(finding.hotspot_records)
        if record["kind"] == "fixed-region"
    ]
    patterns = [(cls, k) for cls, finding in findings.items() for k in range(len(finding.patterns))]
    n_tests = 2 * (len(tested) + len(patterns))
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    for finding in findings.values():
        finding.confirmations = [None] * len(finding.hotspots)
        finding.pattern_confirmations = [None] * len(finding.patterns)
    for number, (cls, i) in enumerate(tested):
        donors, donor_probs = class_images(
            classifier, summary, {cls}, settings, seed, batch_size, cache
        )
        others = set(reservoirs.by_key) - {cls}
        recipients, recipient_probs = class_images(
            classifier, summary, others, settings, seed, batch_size, cache
        )
        findings[cls].confirmations[i] = confirm_hotspot(
            classifier,
            cls,
            tuple(findings[cls].hotspot_records[i]["box"]),
            donors,
            recipients,
            rule=settings.rule,
            n_tests=n_tests,
            seed=seed + 7919 * (number + 1),
            erase=settings.erase,
            batch_size=batch_size,
            donor_probs=donor_probs,
            recipient_probs=recipient_probs,
        )
    for number, (cls, k) in enumerate(patterns, start=len(tested)):
        others = set(reservoirs.by_key) - {cls}
        recipients, recipient_probs = class_images(
            classifier, summary, others, settings, seed, batch_size, cache
        )
        findings[cls].pattern_confirmations[k] = confirm_pattern(
            classifier,
            findings[cls].patterns[k],
            recipients,
            recipient_probs=recipient_probs,
            rule=settings.rule,
            n_tests=n_tests,
            seed=seed + 7919 * (number + 1),
            erase=settings.erase,
            max_images=settings.confirm_images,
            batch_size=batch_size,
        )


def class_images(
    classifier: Classifier,
    summary: AuditSummary,
    classes: set[int],
    settings: AuditSettings,
    seed: int,
    batch_size: int,
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``confirm_images`` images of ``classes`` (uint8, input size; a seeded sample of
    the SpRAy samples) and the model's probabilities for them (cached by class set)."""
    key = tuple(sorted(classes))
    if key not in cache:
        sources = [s for cls in key for _, s, _ in summary.reservoirs.items(cls)]
        rng = np.random.default_rng([seed, len(key), *key[:4]])
        if len(sources) > settings.confirm_images:
            chosen = rng.choice(len(sources), settings.confirm_images, replace=False)
            sources = [sources[i] for i in sorted(chosen)]
        loaded = load_images([Path(s) for s in sources], [0] * len(sources), classifier.input_size)
        cache[key] = (loaded.images, predict_probs(classifier, loaded.images, batch_size))
    return cache[key]
