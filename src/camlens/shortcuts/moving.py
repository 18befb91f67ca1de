"""Moving shortcuts: a small pattern the model reads wherever it is (the hospital token).

A fixed-place shortcut (a tag in a corner) is hot at the same cells on many images and the
frequency maps of ``camlens.shortcuts.find`` show it. A marker that moves (Zech et al. 2018:
the metal "L" token on chest films) is hot on many images too, but every time somewhere else,
so no cell is hot often. It is found by *what* is there instead of *where*:

1. **Cut out** (``hot_regions``, in the map pass): per image, the small hot regions of its
   normalised map: around each local maximum, the connected cells above ``level`` times the
   peak, kept when they cover at most ``max_area`` of the image (an object-sized blob is not
   a marker). Each region is described by the model's own feature vector at its peak cell,
   from the layer the map comes from (``region_features``).
2. **Collect** (``PatternCollector``, in the fold): a seeded reservoir of images per class,
   each with its regions; with annotations, regions lying mostly on the object are dropped
   (the object moves too, and recurs on every image of its class). Memory is bounded by the
   reservoir, whatever the number of images.
3. **Cluster** (``find_patterns``): per class, the regions' unit feature vectors are grouped
   by average-linkage agglomerative clustering on the cosine distance (scikit-learn). A
   cluster is a candidate *pattern* when it recurs on at least ``min_share`` of the class's
   sampled images, at varying places (the spread of its centres is at least ``min_spread``:
   a cluster that stays put is the hotspot search's business), and far more often than on the
   other classes' images (``specificity``).
4. **Confirm** (``confirm_pattern``): paste the pattern (each found region's pixels) at a
   random place onto other classes' images, against pasting a random patch of the same size
   from the same image at the same place (paired, McNemar); erase it where it was found,
   against erasing a random patch of the same size (paired, sign test). The decision is the
   audit's rule (``camlens.shortcuts.confirm.decide``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from camlens.errors import ConfigError
from camlens.io.imagefolder import load_images
from camlens.models import Classifier
from camlens.shortcuts.confirm import (
    Confirmation,
    ConfirmRule,
    EraseTest,
    PasteTest,
    decide,
    erase_regions,
    flip_outcomes,
    mcnemar_greater,
    pixel_box,
    predict_probs,
    random_boxes,
    sign_test_greater,
)
from camlens.shortcuts.find import region_box
from camlens.shortcuts.spray import ClassReservoirs

__all__ = [
    "PATTERN_MODES",
    "Pattern",
    "PatternCollector",
    "PatternSettings",
    "confirm_pattern",
    "find_patterns",
    "hot_regions",
    "region_features",
]

BoxF = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]

#: Which images the pattern search looks at: only annotated ones (regions off the object),
#: all images (without annotations a small object that moves is a "pattern" too), or none.
PATTERN_MODES = ("annotated", "all", "off")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PatternSettings:
    """How the moving-pattern search cuts, clusters and keeps regions.

    Attributes:
        mode: one of ``PATTERN_MODES``.
        level: a region is the connected cells above ``level`` times its peak.
        floor: peaks below this (maps are normalised to a maximum of 1) are not regions.
        max_area: a region covers at most this share of the image.
        max_regions: regions kept per image, hottest first.
        max_on_object: with annotations, a region is dropped when more than this share of
            its box's cells touch the object (0: any contact; a region on the object's edge
            is the object seen by a blurry map, and erasing it would blur the object too).
        images: images per class kept for clustering (seeded reservoir).
        distance: clusters are cut at this average cosine distance.
        min_share: a pattern recurs on at least this share of the class's sampled images.
        min_spread: root of the summed variances of its centres (fractions of the image).
        specificity: its share of the class's images is at least this many times its share
            of the other classes' images.
        max_patterns: candidates tested per class, most frequent first.

    Example:
        >>> PatternSettings(mode="all").check().mode
        'all'
    """

    mode: str = "annotated"
    level: float = 0.75
    floor: float = 0.25
    max_area: float = 0.12
    max_regions: int = 3
    max_on_object: float = 0.0
    images: int = 400
    distance: float = 0.15
    min_share: float = 0.2
    min_spread: float = 0.1
    specificity: float = 2.0
    max_patterns: int = 3

    def check(self) -> PatternSettings:
        """These settings, after checking them (a bad value raises ``ConfigError``)."""
        problems = []
        if self.mode not in PATTERN_MODES:
            problems.append(f"mode must be one of {', '.join(PATTERN_MODES)}, got {self.mode!r}")
        for name in ("level", "floor", "max_area", "min_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.max_on_object < 1.0:
            problems.append(f"max_on_object must lie in [0, 1), got {self.max_on_object}")
        if not 0.0 < self.distance < 2.0:
            problems.append(f"distance must lie in (0, 2), got {self.distance}")
        for name in ("max_regions", "images", "max_patterns"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if problems:
            raise ConfigError("bad moving-pattern settings: " + "; ".join(problems))
        return self


# --- 1. cut out ------------------------------------------------------------------------------


def hot_regions(
    grid_map: np.ndarray,
    *,
    level: float = 0.75,
    floor: float = 0.25,
    max_area: float = 0.12,
    max_regions: int = 3,
) -> list[tuple[BoxF, float, tuple[int, int]]]:
    """The small hot regions of one normalised map, hottest first.

    Around each local maximum (3 x 3 neighbourhood) of at least ``floor``, the 8-connected
    cells of at least ``level`` times the peak form a region; regions larger than
    ``max_area`` of the map, and peaks inside an earlier region, are skipped.

    Parameters:
        grid_map: (G, G) map in [0, 1].
        level, floor, max_area, max_regions: see ``PatternSettings``.

    Returns:
        ``(box, peak, (row, col))`` per region: its box as fractions of the image
        ``(x0, y0, x1, y1)``, its peak value and the peak's cell.

    Example:
        >>> m = np.zeros((8, 8)); m[1:3, 5:7] = [[0.6, 1.0], [0.6, 0.8]]
        >>> hot_regions(m)
        [((0.75, 0.125, 0.875, 0.375), 1.0, (1, 6))]
    """
    grid_map = np.asarray(grid_map, dtype=np.float64)
    peaks = (grid_map == ndimage.maximum_filter(grid_map, size=3)) & (grid_map >= floor)
    rows, cols = np.nonzero(peaks)
    order = np.lexsort((cols, rows, -grid_map[rows, cols]))
    used = np.zeros(grid_map.shape, dtype=bool)
    regions = []
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if used[r, c] or len(regions) >= max_regions:
            continue
        peak = float(grid_map[r, c])
        labels, _ = ndimage.label(grid_map >= level * peak, structure=_EIGHT_CONNECTED)
        region = labels == labels[r, c]
        used |= region
        if region.sum() / region.size > max_area:
            continue
        regions.append((region_box(region)[1], peak, (r, c)))
    return regions


def region_features(
    activations: torch.Tensor, cells: Sequence[tuple[int, int, int]], grid: int
) -> torch.Tensor:
    """The feature vector at each region's peak, from the layer the maps come from.

    Parameters:
        activations: (N, C, h, w) the feature layer's output for the batch.
        cells: ``(image, row, col)`` per region, the peak's cell on the ``grid`` x ``grid``
            audit grid (mapped to the feature cell that covers it).
        grid: the audit grid's side.

    Returns:
        (R, C) float32.

    Example:
        >>> a = torch.arange(8.0).view(1, 2, 2, 2)
        >>> region_features(a, [(0, 3, 0)], grid=4).tolist()  # grid cell (3, 0) -> (1, 0)
        [[2.0, 6.0]]
    """
    height, width = activations.shape[-2:]
    if not cells:
        return torch.zeros((0, activations.shape[1]), dtype=torch.float32)
    index = torch.tensor(cells, dtype=torch.long)
    rows = (index[:, 1] * height) // grid
    cols = (index[:, 2] * width) // grid
    return activations.detach()[index[:, 0], :, rows, cols].float().cpu()


# --- 2. collect ------------------------------------------------------------------------------


@dataclass
class _Sampled:
    index: int
    source: str
    boxes: np.ndarray  # (R, 4) fractions
    features: np.ndarray  # (R, C) float16, unit length


class PatternCollector:
    """Per class, a seeded reservoir of images with their small hot regions (bounded memory:
    at most ``images`` x ``max_regions`` unit feature vectors in float16 per class, 1.2 MB
    for 2,048 channels at the defaults).

    Parameters:
        settings: the search's settings (``images``: the reservoir's capacity per class).
        seed: seeds the reservoirs.

    Example:
        >>> c = PatternCollector(PatternSettings(), seed=0)
        >>> c.add(0, 3, "x.png", np.array([[0.1, 0.1, 0.2, 0.2]]), np.ones((1, 4)))
        >>> len(c.sampled(0)), c.sampled(0)[0].features.round(2).tolist()
        (1, [[0.5, 0.5, 0.5, 0.5]])
    """

    def __init__(self, settings: PatternSettings, seed: int = 0) -> None:
        self.settings = settings
        self.reservoirs = ClassReservoirs(settings.images, seed + 104729)

    def add(
        self,
        cls: int,
        index: int,
        source: str,
        boxes: np.ndarray,
        features: np.ndarray,
        on_object: np.ndarray | None = None,
    ) -> None:
        """Offer one image's regions; with ``on_object`` (bool per region) those on the
        object are dropped. Regions whose features are all zero are dropped too."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        features = np.asarray(features, dtype=np.float32)
        features = features.reshape(len(boxes), features.shape[-1] if features.ndim else 0)
        norms = np.linalg.norm(features, axis=1)
        keep = norms > 0
        if on_object is not None:
            keep &= ~np.asarray(on_object, dtype=bool)
        unit = (features[keep] / norms[keep, None]).astype(np.float16)  # half the memory
        self.reservoirs.add(cls, _Sampled(int(index), source, boxes[keep], unit))

    def sampled(self, cls: int) -> list[_Sampled]:
        """The sampled images of class ``cls`` (with or without regions)."""
        return self.reservoirs.items(cls)

    @property
    def classes(self) -> list[int]:
        return sorted(int(k) for k in self.reservoirs.by_key)


# --- 3. cluster ------------------------------------------------------------------------------


@dataclass
class Pattern:
    """A candidate moving pattern of one class.

    Attributes:
        cls: the class index.
        sources: the image of each location (one per image).
        boxes: the region's box on each image, fractions ``(x0, y0, x1, y1)``.
        similarity: cosine similarity of each location's features with the pattern's centre.
        n_sampled: the class's sampled images (the share's denominator).
        other_share: share of the other classes' sampled images with such a region.
        spread: root of the summed variances of the locations' centres.
        exemplar: the location most like the centre (an index into ``sources``).
    """

    cls: int
    sources: list[str]
    boxes: list[BoxF]
    similarity: list[float]
    n_sampled: int
    other_share: float
    spread: float
    exemplar: int = 0
    centre: np.ndarray | None = field(default=None, repr=False)

    @property
    def share(self) -> float:
        """Share of the class's sampled images where the pattern was found."""
        return len(self.sources) / max(self.n_sampled, 1)

    def locations(self) -> list[dict[str, Any]]:
        """``{"image", "box"}`` per image where it was found (box as fractions)."""
        return [
            {"image": source, "box": [round(v, 4) for v in box]}
            for source, box in zip(self.sources, self.boxes, strict=True)
        ]


def find_patterns(
    collector: PatternCollector,
    cls: int,
    *,
    seed: int = 0,
) -> list[Pattern]:
    """The candidate moving patterns of class ``cls`` (see the module docstring), most
    frequent first, at most ``settings.max_patterns``.

    Example:
        >>> c = PatternCollector(PatternSettings(images=50))
        >>> rng = np.random.default_rng(0)
        >>> for i in range(20):  # class 0: the same feature at a new place on every image
        ...     x, y = rng.uniform(0, 0.8, 2)
        ...     c.add(0, i, f"a{i}.png", np.array([[x, y, x + 0.1, y + 0.1]]), np.array([[1.0, 0.0]]))
        ...     c.add(1, 20 + i, f"b{i}.png", np.array([[x, y, x + 0.1, y + 0.1]]), np.array([[0.0, 1.0]]))
        >>> [(p.cls, len(p.sources), p.other_share) for p in find_patterns(c, 0)]
        [(0, 20, 0.0)]
    """
    settings = collector.settings
    sampled = collector.sampled(cls)
    owner = np.array([i for i, s in enumerate(sampled) for _ in range(len(s.boxes))], dtype=int)
    if len(owner) < 2:
        return []
    features = np.concatenate([s.features for s in sampled if len(s.boxes)]).astype(np.float32)
    boxes = np.concatenate([s.boxes for s in sampled if len(s.boxes)])
    labels = _cluster(features, settings.distance)
    others = [s for other in collector.classes if other != cls for s in collector.sampled(other)]
    patterns = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        pattern = _pattern(cls, members, owner, features, boxes, sampled, others, settings)
        if pattern is not None:
            patterns.append(pattern)
    patterns.sort(key=lambda p: (-len(p.sources), p.sources[p.exemplar]))
    return patterns[: settings.max_patterns]


def _cluster(features: np.ndarray, distance: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering  # imported on use (~0.5 s)

    model = AgglomerativeClustering(
        n_clusters=None, distance_threshold=distance, metric="cosine", linkage="average"
    )
    return model.fit_predict(features.astype(np.float64))


def _pattern(
    cls: int,
    members: np.ndarray,
    owner: np.ndarray,
    features: np.ndarray,
    boxes: np.ndarray,
    sampled: list[_Sampled],
    others: list[_Sampled],
    settings: PatternSettings,
) -> Pattern | None:
    """A cluster as a pattern, or None when it is too rare, stays put or is not specific."""
    centre = features[members].mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    similarity = features[members] @ centre
    best: dict[int, int] = {}  # image -> its member most like the centre
    for k, member in enumerate(members.tolist()):
        image = int(owner[member])
        if image not in best or similarity[k] > similarity[best[image]]:
            best[image] = k
    if len(best) / len(sampled) < settings.min_share:
        return None
    chosen = [best[image] for image in sorted(best, key=lambda i: sampled[i].index)]
    chosen_boxes = boxes[members[chosen]]
    centres = (chosen_boxes[:, :2] + chosen_boxes[:, 2:]) / 2
    spread = float(np.sqrt(centres.var(axis=0).sum()))
    if spread < settings.min_spread:
        return None
    radius = float(np.quantile(similarity, 0.1))
    found = sum(
        1
        for s in others
        if len(s.features) and float((s.features.astype(np.float32) @ centre).max()) >= radius
    )
    other_share = found / max(len(others), 1)
    if len(best) / len(sampled) < settings.specificity * other_share:
        return None
    sims = [float(similarity[k]) for k in chosen]
    return Pattern(
        cls=cls,
        sources=[sampled[int(owner[members[k]])].source for k in chosen],
        boxes=[tuple(float(v) for v in chosen_boxes[j]) for j in range(len(chosen))],
        similarity=sims,
        n_sampled=len(sampled),
        other_share=other_share,
        spread=spread,
        exemplar=int(np.argmax(sims)),
        centre=centre,
    )


# --- 4. confirm ------------------------------------------------------------------------------


def confirm_pattern(
    classifier: Classifier,
    pattern: Pattern,
    recipients: torch.Tensor,
    *,
    recipient_probs: torch.Tensor | None = None,
    rule: ConfirmRule | None = None,
    n_tests: int = 1,
    seed: int = 0,
    erase: str = "blur",
    max_images: int = 100,
    batch_size: int = 64,
) -> Confirmation:
    """Paste the pattern at random places onto ``recipients`` and erase it where it was
    found, each against a random patch of the same size (see the module docstring).

    Parameters:
        classifier: the model.
        pattern: the candidate (its images are read from ``pattern.sources``).
        recipients: (R, 3, H, W) uint8 images of the other classes at the input size.
        recipient_probs: their probabilities when already known.
        rule, n_tests: the decision rule and the number of tests of the whole audit.
        seed: seeds the choice of locations, donors, places and baseline patches.
        erase: ``"blur"`` or ``"mean"``.
        max_images: locations used (a seeded sample when there are more).

    Example:
        >>> from PIL import Image
        >>> from torch import nn
        >>> from camlens.models import load_model
        >>> class White(nn.Module):  # class 1 = "some pixel is white", wherever it is
        ...     def forward(self, x):
        ...         white = (x.amin(1) > 0.95).float().amax((1, 2))
        ...         return torch.stack([1 - white, white], 1) * 10
        >>> model = load_model(White(), labels=["plain", "marked"], input_size=32)
        >>> images = torch.randint(0, 100, (20, 3, 32, 32), dtype=torch.uint8)
        >>> images[:, :, 4:8, 10:14] = 255  # the marker (at one place, for brevity)
        >>> for i, image in enumerate(images):
        ...     _ = Image.fromarray(image.permute(1, 2, 0).numpy()).save(f"m{i}.png")
        >>> p = Pattern(1, [f"m{i}.png" for i in range(20)], [(10 / 32, 4 / 32, 14 / 32, 8 / 32)] * 20,
        ...             [1.0] * 20, 20, 0.0, 0.0)
        >>> others = torch.randint(0, 100, (30, 3, 32, 32), dtype=torch.uint8)
        >>> c = confirm_pattern(model, p, others, erase="mean")
        >>> c.confirmed, c.paste.flip_rate, c.paste.baseline_flip_rate
        (True, 1.0, 0.0)
    """
    rule = rule or ConfirmRule()
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(pattern.sources))
    if len(chosen) > max_images:
        chosen = np.sort(rng.choice(len(chosen), max_images, replace=False))
    loaded = load_images(
        [Path(pattern.sources[i]) for i in chosen], chosen.tolist(), classifier.input_size
    )
    images = loaded.images
    height, width = images.shape[-2:]
    boxes = [pixel_box(pattern.boxes[int(i)], height, width) for i in loaded.targets.tolist()]
    paste = _paste_test(classifier, pattern.cls, images, boxes, recipients, rng, recipient_probs,
                        batch_size)  # fmt: skip
    erased = _erase_test(classifier, pattern.cls, images, boxes, rng, erase, batch_size)
    return decide(paste, erased, rule, n_tests)


def _paste_test(
    classifier: Classifier,
    cls: int,
    donors: torch.Tensor,
    boxes: list[PixelBox],
    recipients: torch.Tensor,
    rng: np.random.Generator,
    before: torch.Tensor | None,
    batch_size: int,
    n_examples: int = 3,
) -> PasteTest:
    """Each recipient gets a random donor's found region at a random place; its baseline
    twin gets a random patch of the same size from the same donor, at the same place."""
    if len(donors) == 0 or len(recipients) == 0:
        return PasteTest(0, 0, 0, 1.0)
    height, width = recipients.shape[-2:]
    pasted, baseline = recipients.clone(), recipients.clone()
    places = []
    for i, donor in enumerate(rng.integers(0, len(donors), len(recipients)).tolist()):
        source = boxes[donor]
        (other,) = random_boxes(rng, 1, source, height, width)
        box_w, box_h = source[2] - source[0], source[3] - source[1]
        x0 = int(rng.integers(0, width - box_w + 1))
        y0 = int(rng.integers(0, height - box_h + 1))
        place = (x0, y0, x0 + box_w, y0 + box_h)
        pasted[i, :, y0 : y0 + box_h, x0 : x0 + box_w] = _crop(donors[donor], source)
        baseline[i, :, y0 : y0 + box_h, x0 : x0 + box_w] = _crop(donors[donor], other)
        places.append(place)
    if before is None:
        before = predict_probs(classifier, recipients, batch_size)
    after = predict_probs(classifier, pasted, batch_size)
    after_baseline = predict_probs(classifier, baseline, batch_size)
    eligible, flipped = flip_outcomes(before.argmax(dim=1), after.argmax(dim=1), cls)
    _, flipped_baseline = flip_outcomes(before.argmax(dim=1), after_baseline.argmax(dim=1), cls)
    p_value = mcnemar_greater(
        int((flipped & ~flipped_baseline).sum()), int((~flipped & flipped_baseline).sum())
    )
    candidates = [i for i in range(len(recipients)) if eligible[i]]
    order = sorted(candidates, key=lambda i: (not bool(flipped[i]), i))[:n_examples]
    examples = [
        {
            "before": _hwc(recipients[i]),
            "after": _hwc(pasted[i]),
            "before_class": int(before[i].argmax()),
            "before_prob": float(before[i].max()),
            "after_class": int(after[i].argmax()),
            "after_prob": float(after[i].max()),
            "box": places[i],
        }
        for i in order
    ]
    return PasteTest(
        int(eligible.sum()), int(flipped.sum()), int(flipped_baseline.sum()), p_value, examples
    )


def _erase_test(
    classifier: Classifier,
    cls: int,
    images: torch.Tensor,
    boxes: list[PixelBox],
    rng: np.random.Generator,
    mode: str,
    batch_size: int,
    n_examples: int = 3,
) -> EraseTest:
    """Erase each image's found region, against a random patch of the same size elsewhere."""
    n = len(images)
    if n == 0:
        return EraseTest(0, 0.0, 0.0, 0.0, 1.0)
    height, width = images.shape[-2:]
    others = [random_boxes(rng, 1, box, height, width)[0] for box in boxes]
    erased = erase_regions(images, boxes, mode)
    baseline = erase_regions(images, others, mode)
    before = predict_probs(classifier, images, batch_size)[:, cls]
    after = predict_probs(classifier, erased, batch_size)[:, cls]
    after_baseline = predict_probs(classifier, baseline, batch_size)[:, cls]
    difference = (after_baseline - after).numpy()
    p_value = sign_test_greater(int((difference > 1e-6).sum()), int((difference < -1e-6).sum()))
    order = np.argsort(-(before - after).numpy(), kind="stable")[:n_examples]
    examples = [
        {
            "before": _hwc(images[i]),
            "after": _hwc(erased[i]),
            "before_prob": float(before[i]),
            "after_prob": float(after[i]),
            "box": boxes[i],
        }
        for i in order.tolist()
    ]
    return EraseTest(
        n,
        float(before.mean()),
        float(after.mean()),
        float(after_baseline.mean()),
        p_value,
        examples,
    )


def _crop(image: torch.Tensor, box: PixelBox) -> torch.Tensor:
    x0, y0, x1, y1 = box
    return image[:, y0:y1, x0:x1]


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).to(torch.uint8).numpy()
