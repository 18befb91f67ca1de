"""Does the map depend on the model at all? Adebayo et al.'s model-randomisation test.

Cascading parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
NeurIPS): re-initialise the model's layers from the top (the logits) down, one stage more at a
time, and compare the maps of the randomised model with those of the trained one for the same
images and classes. A method that explains the model must produce different maps once the
weights are gone: the rank correlation and the structural similarity should fall towards 0.
A method whose maps stay similar mostly shows the input (edges, contrast), not the model.

The user's model is never touched: the layers of a deep copy are re-initialised.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import get_layer, preserved_state
from camlens.localize import normalize_maps
from camlens.methods import CAMMethod, get_method
from camlens.models import Classifier, load_model
from camlens.targets import Target

__all__ = [
    "SanityStage",
    "cascading_randomization",
    "map_similarity",
    "randomization_stages",
    "randomize_modules",
]

_INDEX = re.compile(r"^\d+$")


@dataclass
class SanityStage:
    """Similarity of the maps after one more stage of the model was re-initialised.

    Attributes:
        stage: the topmost block this stage re-initialised (``_fc``, ``layer4.1``...).
        modules: the modules re-initialised in this stage (cumulative with earlier stages).
        spearman: mean Spearman rank correlation between the trained and randomised maps
            (NaN-aware: images whose randomised map is constant are left out).
        ssim: mean structural similarity of the maps (data range 1).
        spearman_per_image, ssim_per_image: the values per image.
    """

    stage: str
    modules: list[str]
    spearman: float
    ssim: float
    spearman_per_image: list[float] = field(default_factory=list)
    ssim_per_image: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "modules": list(self.modules),
            "spearman": _json_float(self.spearman),
            "ssim": _json_float(self.ssim),
        }


def map_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation and SSIM of two (H, W) maps in [0, 1].

    The correlation is NaN when either map is constant (no ranking to compare).

    Example:
        >>> m = np.random.default_rng(0).random((16, 16))
        >>> [round(v, 6) for v in map_similarity(m, m)]
        [1.0, 1.0]
        >>> [round(v, 2) for v in map_similarity(m, m**2)]  # the same ranking, other values
        [1.0, 0.91]
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        rho = float("nan")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = float(spearmanr(a.ravel(), b.ravel()).statistic)
    side = min(a.shape)
    window = min(7, side if side % 2 == 1 else side - 1)
    ssim = float(structural_similarity(a, b, data_range=1.0, win_size=max(window, 3)))
    return rho, ssim


def randomization_stages(
    module: nn.Module, example: torch.Tensor, *, n_stages: int | None = None
) -> list[list[str]]:
    """Group the modules that own parameters into stages, from the top of the network down.

    Modules are ordered by when they run in a forward pass of ``example`` (modules that never
    run come last). Modules of one block share a stage: the block is the qualified name up to
    its first numeric part (``layer4.1.conv2`` -> ``layer4.1``, ``_blocks.15._bn2`` ->
    ``_blocks.15``); other modules (``fc``, ``conv1``) are stages of their own. With
    ``n_stages``, consecutive stages are merged into at most that many, the topmost stage
    (the classifier) always alone.

    Example:
        >>> import torchvision
        >>> randomization_stages(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64))[:3]
        [['fc'], ['layer4.1.bn2', 'layer4.1.conv2', 'layer4.1.bn1', 'layer4.1.conv1'], ...]
    """
    names = _forward_order(module, example)
    groups: list[list[str]] = []
    keys: list[str] = []
    for name in reversed(names):
        key = _block_key(name)
        if keys and keys[-1] == key:
            groups[-1].append(name)
        else:
            groups.append([name])
            keys.append(key)
    if n_stages is not None:
        if n_stages < 1:
            raise ConfigError(f"n_stages must be at least 1, got {n_stages}")
        groups = _merge(groups, n_stages)
    return groups


def randomize_modules(module: nn.Module, names: Sequence[str], *, seed: int = 0) -> None:
    """Re-initialise the parameters (and batch-norm statistics) of the named sub-modules, in
    place, with their own ``reset_parameters()`` (PyTorch's default initialisation; batch norm
    becomes the identity with mean 0 and variance 1). Parameters of modules without
    ``reset_parameters`` are redrawn from a normal distribution with their own standard
    deviation. The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in names:
            sub = get_layer(module, name)
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
                continue
            for param in sub.parameters(recurse=False):
                std = float(param.std()) if param.numel() > 1 else 0.02
                param.normal_(0.0, std if std > 0 else 0.02)


def cascading_randomization(
    model: Classifier | nn.Module | str,
    x: torch.Tensor,
    method: str = "cam",
    *,
    target: Target = "top1",
    layer: str | None = None,
    stages: int | Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
) -> list[SanityStage]:
    """Adebayo et al.'s cascading randomisation: map similarity per randomised stage.

    Parameters:
        model: the trained model (a ``Classifier``, an ``nn.Module`` or a spec).
        x: (N, C, H, W) preprocessed images.
        method: a registered method name (``camlens.METHODS``).
        target: what to explain on the trained model (``"top1"`` by default); the randomised
            models explain the same classes.
        layer: feature layer (default: the method's automatic choice on the trained model).
        stages: ``None`` (every block, see :func:`randomization_stages`), a number of stages,
            or explicit module names from the top down (each entry a name or a list of names).
        seed: seed of the re-initialisation.

    Returns:
        One :class:`SanityStage` per stage, from the top down; the last one has the whole
        model re-initialised.

    Example:
        >>> import camlens
        >>> model = camlens.load_model()                   # EfficientNet-Lite0: 21 blocks
        >>> x = model.preprocess(["cat.jpg"])
        >>> stages = cascading_randomization(model, x, "gradcam", stages=4)
        >>> [s.stage for s in stages]
        ['_fc', '_bn1', '_blocks.11', '_blocks.4']
        >>> [round(s.spearman, 2) for s in stages]  # falls as more of the model is random
        [0.71, 0.46, 0.45, 0.11]
    """
    if isinstance(model, nn.Module):  # wrap without load_model, which sets eval mode
        classifier = Classifier(module=model, labels=[], name=type(model).__name__)
    else:
        classifier = model if isinstance(model, Classifier) else load_model(model)
    reference = _make(classifier, classifier.module, method, layer)
    result = reference.run(x, target)
    targets = result.targets
    size = tuple(x.shape[-2:])
    trained = normalize_maps(result.raw, size).cpu().numpy()
    groups = _stage_groups(classifier.module, x, stages)
    randomized = copy.deepcopy(classifier.module)
    findings = []
    for index, names in enumerate(groups):
        randomize_modules(randomized, names, seed=seed + index)
        instance = _make(classifier, randomized, method, result.layer)
        raw = instance.run(x, targets).raw
        maps = normalize_maps(raw, size).cpu().numpy()
        pairs = [
            map_similarity(trained[i, k], maps[i, k])
            for i in range(maps.shape[0])
            for k in range(maps.shape[1])
        ]
        rhos = [p[0] for p in pairs]
        ssims = [p[1] for p in pairs]
        findings.append(
            SanityStage(
                _block_key(names[0]), list(names), _nanmean(rhos), _nanmean(ssims), rhos, ssims
            )
        )
    return findings


def _make(classifier: Classifier, module: nn.Module, method: str, layer: str | None) -> CAMMethod:
    return get_method(method)(
        module,
        layer=layer or classifier.layer,
        output=classifier.output,
        labels=classifier.labels,
    )


def _stage_groups(
    module: nn.Module, x: torch.Tensor, stages: int | Sequence[str | Sequence[str]] | None
) -> list[list[str]]:
    if stages is None or isinstance(stages, int):
        groups = randomization_stages(module, x[:1], n_stages=stages)
    else:
        groups = [[s] if isinstance(s, str) else list(s) for s in stages]
        for group in groups:
            for name in group:
                get_layer(module, name)
    if not groups:
        raise ConfigError("the model has no parameters to randomise")
    return groups


def _forward_order(module: nn.Module, example: torch.Tensor) -> list[str]:
    owners = {
        name: sub
        for name, sub in module.named_modules()
        if any(True for _ in sub.parameters(recurse=False))
    }
    seen: list[str] = []
    handles = []

    def hook(name: str):
        def record(*_: object) -> None:
            if name not in seen:
                seen.append(name)

        return record

    try:
        for name, sub in owners.items():
            handles.append(sub.register_forward_hook(hook(name)))
        with preserved_state(module), torch.inference_mode():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    never_ran = [name for name in owners if name not in seen]
    return never_ran + seen if never_ran else seen


def _block_key(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return name


def _merge(groups: list[list[str]], n_stages: int) -> list[list[str]]:
    if len(groups) <= n_stages:
        return groups
    if n_stages == 1:
        return [[name for group in groups for name in group]]
    rest = groups[1:]
    bounds = np.linspace(0, len(rest), n_stages, dtype=int)
    merged = [groups[0]]
    for start, stop in itertools.pairwise(bounds):
        merged.append([name for group in rest[start:stop] for name in group])
    return merged


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
