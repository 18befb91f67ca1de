"""``camlens.factorize`` (concepts of a batch, in memory) and ``camlens.concepts`` (a folder).

Deep Feature Factorization (Collins, Achanta & Süsstrunk, ECCV 2018): see
``camlens.methods.concepts`` for the factorisation and its conventions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from camlens.api.explaining import Images, job_folder, job_model
from camlens.errors import ConfigError
from camlens.io import collect_inputs, load_image
from camlens.localize import normalize_maps
from camlens.methods.concepts import (
    RANDOM_STATE,
    ConceptBasis,
    TopClass,
    concept_shares,
    fit_concepts,
)
from camlens.models import Classifier, load_model
from camlens.pipeline import OutputFolder, RunOptions, RunResult, run
from camlens.tasks.common import load_input
from camlens.tasks.concepts import (
    BASIS_FILE,
    DEFAULT_FIT_IMAGES,
    ConceptsTask,
    ConceptStyle,
    concept_colors,
    write_concept_table,
)
from camlens.writers import write_npz

__all__ = ["Concepts", "concepts", "factorize"]


@dataclass
class Concepts:
    """K concepts of a batch of images and where they are in each image.

    Attributes:
        basis: the fitted concepts (``ConceptBasis``: vectors, peaks, layer, top classes).
        raw: (N, K, h, w) float32 coefficient maps at the layer's resolution (non-negative,
            un-normalised; comparable across concepts: the norm of each concept's part of the
            activation at each position).
        input_size: (H, W) of the model input, the size of ``maps``.
        classifier: the model, for :meth:`transform`.

    ``maps`` (N, K, H, W) in [0, 1] are ``normalize_maps(raw, input_size)`` (each map divided
    by its own maximum, like every camlens map); ``shares`` (N, K) each concept's share of an
    image's map mass.
    """

    basis: ConceptBasis
    raw: torch.Tensor
    input_size: tuple[int, int]
    classifier: Classifier = field(repr=False)

    @property
    def vectors(self) -> torch.Tensor:
        """(K, C) the unit-norm concept vectors."""
        return torch.from_numpy(self.basis.vectors)

    @property
    def top_classes(self) -> tuple[tuple[TopClass, ...], ...]:
        """Per concept, its most likely classes (``TopClass``: id, label, prob)."""
        return self.basis.top_classes

    @property
    def maps(self) -> torch.Tensor:
        """(N, K, H, W) float32 in [0, 1] at input resolution."""
        return normalize_maps(self.raw, self.input_size)

    @property
    def shares(self) -> torch.Tensor:
        """(N, K) each concept's share of each image's map mass (rows sum to 1)."""
        return concept_shares(self.raw)

    def transform(self, images: Images) -> Concepts:
        """The maps of new images against these concepts (the basis stays fixed).

        Example:
            >>> found = camlens.factorize("efficientnet_lite0", ["photos/cat.jpg", "cat.jpg"], k=3)
            >>> found.transform(["photos/coffee.jpg"]).raw.shape
            torch.Size([1, 3, 7, 7])
        """
        x = _batch(self.classifier, images)
        raw = self.basis.transform(self.classifier, x)
        return Concepts(self.basis, raw, tuple(x.shape[-2:]), self.classifier)


def factorize(
    model: Classifier | nn.Module | str,
    images: Images,
    k: int = 5,
    *,
    layer: str | None = None,
    top: int = 3,
    random_state: int = RANDOM_STATE,
) -> Concepts:
    """Deep Feature Factorization of ``images``: K concepts shared by the batch.

    The ReLU'd activations of ``layer`` (N images x h x w positions, C channels) are
    factorised as ``A ≈ H W`` with ``H >= 0`` (N*h*w x K) and ``W >= 0`` (K x C) by
    scikit-learn's NMF (Collins, Achanta & Süsstrunk, "Deep Feature Factorization for
    Concept Discovery", ECCV 2018). Concept ``k``'s map in image ``n`` is column ``k`` of ``H``
    reshaped to (h, w); its classes are the softmax of the classifier's linear head applied
    to the concept (its vector at its peak strength).

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec or an ``nn.Module``.
        images: paths, PIL images, or a preprocessed batch (N, 3, H, W).
        k: the number of concepts (1 <= k <= channels).
        layer: the layer (default: the one that feeds global average pooling).
        top: the number of classes kept per concept.
        random_state: the seed of the NMF initialisation (fixed: same images, same concepts).

    Returns:
        ``Concepts``: ``basis``, ``vectors`` (K, C), ``raw`` (N, K, h, w), ``maps``
        (N, K, H, W) in [0, 1], ``shares`` (N, K), ``top_classes``, ``transform(images)``.

    Raises:
        ConfigError: k out of range, an unknown layer, all-zero activations.

    Example:
        >>> import camlens
        >>> photos = ["photos/cat.jpg", "photos/coffee.jpg"]
        >>> found = camlens.factorize("efficientnet_lite0", photos, k=2)
        >>> [top[0].label for top in found.top_classes]
        ['Egyptian cat', 'espresso']
        >>> found.raw.shape, found.maps.shape  # coefficients at 7 x 7; [0, 1] at 224 x 224
        (torch.Size([2, 2, 7, 7]), torch.Size([2, 2, 224, 224]))
        >>> found.shares.argmax(dim=1).tolist()  # the cat photo is mostly concept 0
        [0, 1]
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    x = _batch(classifier, images)
    basis, raw = fit_concepts(classifier, x, k, layer=layer, top=top, random_state=random_state)
    return Concepts(basis, raw, tuple(x.shape[-2:]), classifier)


def concepts(
    model: Classifier | nn.Module | str | Callable[[], Classifier],
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | OutputFolder,
    *,
    k: int = 5,
    layer: str | None = None,
    fit_images: int = DEFAULT_FIT_IMAGES,
    top: int = 3,
    style: ConceptStyle | None = None,
    options: RunOptions | None = None,
) -> RunResult:
    """Find K concepts in a folder of images and draw them on every image (``camlens
    concepts``).

    The concepts are fitted on the first ``fit_images`` inputs (unreadable ones skipped);
    then every input, batch by batch, gets its maps against that one basis. Writes
    ``concepts/<n>_<name>.png`` (each concept's region in its colour, a legend of the
    concepts' classes), ``raw/<n>_<name>.npz``, ``results.jsonl`` (one record per input),
    ``concepts.json`` and ``concepts.csv`` (per concept: colour, top classes, the number of
    images it dominates) and ``concepts.npz`` (the basis, which a resume reuses).

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec or an ``nn.Module`` (or a function
            that loads it: called once the folder and the inputs are checked).
        inputs: image files and folders (folders are searched recursively, sorted).
        out_dir: the output folder; the folder rules of ``run_explain`` (``options.resume``
            continues an interrupted run with the same settings, basis and inputs).
        k: the number of concepts.
        layer: the layer (default: the one that feeds global average pooling).
        fit_images: how many of the first inputs the concepts are fitted on.
        top: classes per concept.
        style: the concepts' colours, opacity, picture size (``ConceptStyle``).
        options: batch size, device, engine, resume/overwrite, progress (``RunOptions``).

    Returns:
        A ``RunResult``; ``summary["dominant"]``: per concept, the images it dominates.

    Raises:
        ConfigError: bad settings, no images, none of the fit images readable, an output
            folder the rules refuse, a resume with other settings (k, layer, fit images...).

    Example:
        >>> import camlens, os
        >>> options = camlens.RunOptions(progress=False)
        >>> result = camlens.concepts("efficientnet_lite0", "photos/", "out", k=3, options=options)
        >>> result.exit_code, result.summary["dominant"]  # images each concept dominates
        (0, [1, 1, 1])
        >>> sorted(os.listdir("out"))  # doctest: +NORMALIZE_WHITESPACE
        ['.camlens', 'concepts', 'concepts.csv', 'concepts.json', 'concepts.npz', 'raw',
         'results.jsonl']
    """
    options = options or RunOptions()
    _check_counts(k=k, fit_images=fit_images, top=top)
    style = (style or ConceptStyle()).check()
    folder = job_folder(out_dir, options)
    paths = collect_inputs(inputs)
    if not paths:
        raise ConfigError("no images found in the given inputs")
    classifier = job_model(model, options.device)
    basis = _stored_basis(folder) if options.resume else None
    if basis is None:
        basis = _fit_on_inputs(classifier, paths[:fit_images], k, layer, top, options)
    fresh = not folder.prepare(resume=options.resume, overwrite=options.overwrite)
    if fresh:
        write_npz(folder.path(BASIS_FILE), **basis.to_arrays())
    task = ConceptsTask(classifier, basis, k, layer, fit_images, top, style, options.max_pixels)
    result = run(task, paths, folder.root, options, folder=folder)
    colors = concept_colors(basis.k, style.colormap)
    write_concept_table(folder, basis, colors, result.summary["dominant"])
    folder.close()
    return result


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _stored_basis(folder: OutputFolder) -> ConceptBasis | None:
    """The basis an interrupted run saved in ``folder`` (None: no run, or no basis there)."""
    path = folder.root / BASIS_FILE
    if folder.previous_run() is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return ConceptBasis.from_arrays(dict(arrays))
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(
            f"cannot resume in {str(folder.root)!r}: its {BASIS_FILE} cannot be read ({error}); "
            f"start again with {folder.spell('overwrite')}"
        ) from None


def _fit_on_inputs(
    classifier: Classifier,
    paths: Sequence[str | os.PathLike],
    k: int,
    layer: str | None,
    top: int,
    options: RunOptions,
) -> ConceptBasis:
    """Fit the basis on ``paths`` (decoded like the task decodes them; unreadable ones are
    skipped, and become error records in the run), ``options.batch_size`` at a time."""
    tensors = []
    quiet = not options.progress or len(paths) <= 3
    bar = tqdm(paths, desc=f"fitting {k} concepts", unit="img", file=sys.stderr, disable=quiet)
    for index, path in enumerate(bar):
        loaded = load_input(classifier, index, path, max_pixels=options.max_pixels)
        if loaded.error is None:
            tensors.append(loaded.tensor)
    if not tensors:
        raise ConfigError(
            f"none of the first {len(paths)} inputs (the fit images) could be read, so there "
            "is nothing to fit the concepts on; check the inputs"
        )
    size = options.batch_size
    batches = [torch.cat(tensors[i : i + size]) for i in range(0, len(tensors), size)]
    basis, _ = fit_concepts(classifier, batches, k, layer=layer, top=top)
    return basis


def _batch(classifier: Classifier, images: Images) -> torch.Tensor:
    """``images`` as a preprocessed batch on the model's device."""
    if isinstance(images, torch.Tensor):
        return images.to(device=classifier.device)
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    return classifier.preprocess([load_image(item) for item in items])
