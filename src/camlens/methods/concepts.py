"""Deep Feature Factorization (Collins, Achanta & Süsstrunk, ECCV 2018): concepts of a layer.

A layer's activations over a batch of images, ReLU'd (non-negative) and laid out as a matrix
with one row per position and one column per channel,

    A  (N*h*w x C)  ≈  H W,      H >= 0  (N*h*w x K),   W >= 0  (K x C),

are factorised by non-negative matrix factorisation (scikit-learn's ``NMF``, Frobenius loss,
``nndsvda`` initialisation, a fixed ``random_state``: the same activations give the same
concepts). Each row of ``W`` is a *concept*: a direction in channel space that the layer uses
over many positions and images; the column ``k`` of ``H`` reshaped to (N, h, w) says where
concept ``k`` is in each image. Because the factorisation is shared by the whole batch, the
same concept lights up the same kind of part in every image (all the cat heads, all the
wheels), which is the paper's point.

Conventions of camlens (so that maps of different concepts compare):

* each concept vector has unit L2 norm, so a coefficient is the norm of that concept's part
  of the activation vector at that position (``A[p] ≈ sum_k H[p, k] W[k]``);
* concepts are ordered by their total coefficient over the fit images, largest first;
* ``peaks[k]`` is the largest coefficient of concept ``k`` over the fit images, and the
  concept's classes are the classifier's linear head applied to ``peaks[k] * W[k]`` (the
  concept at its strongest, as if it filled the whole feature map), then softmax; as
  pytorch-grad-cam's ``DeepFeatureFactorization`` runs the classifier on the concept vectors.

Maps of new images against a fitted basis solve ``min_H ||A - H W||`` with ``H >= 0`` and
``W`` fixed (``ConceptBasis.coefficients``), so a large folder is processed batch by batch
with one set of concepts, and an image's maps do not depend on the batch it is in.

This module returns raw coefficient maps (N, K, h, w) at the layer's resolution;
``camlens.factorize`` adds the [0, 1] input-size maps (``camlens.localize.normalize_maps``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import LayerCapture, get_layer, preserved_state
from camlens.layers import CamHead, cached_cam_head
from camlens.models import Classifier
from camlens.models.checkpoints import TORCHSCRIPT_NOT_HOOKABLE

__all__ = [
    "NMF_MAX_ITER",
    "RANDOM_STATE",
    "ConceptBasis",
    "TopClass",
    "capture_activations",
    "concept_shares",
    "fit_concepts",
    "nmf_factorize",
]

#: The seed of the factorisation (its SVD-based initialisation): fixed, so runs repeat.
RANDOM_STATE = 0
#: Iterations of the NMF solver (coordinate descent) at most, for fitting and for new images.
NMF_MAX_ITER = 1000
#: Stopping tolerance of the solver when only the coefficients are solved for (new images).
TRANSFORM_TOL = 1e-6


@dataclass(frozen=True)
class TopClass:
    """One of a concept's most likely classes: id, name and softmax probability."""

    id: int
    label: str
    prob: float

    def to_dict(self) -> dict[str, object]:
        """``{"class": id, "label": ..., "prob": ...}``, as in camlens records."""
        return {"class": self.id, "label": self.label, "prob": round(self.prob, 6)}


@dataclass(frozen=True)
class ConceptBasis:
    """K concepts fitted on a layer's activations (see the module docstring).

    Attributes:
        vectors: (K, C) float32, non-negative, unit L2 norm rows: the concepts ``W``.
        peaks: (K,) float32, each concept's largest coefficient over the fit images.
        layer: qualified name of the layer the activations come from.
        call: which call of that layer (-1: the last), for modules that run several times.
        top_classes: per concept, its most likely classes (empty tuples when the layer does
            not feed the classifier's linear layer directly, e.g. an earlier layer).
        reconstruction_error: ``||A - H W||_F`` on the fit images (scikit-learn's
            ``reconstruction_err_``).
        n_iter: iterations the solver ran.
        n_images: number of fit images.
    """

    vectors: np.ndarray
    peaks: np.ndarray
    layer: str
    call: int = -1
    top_classes: tuple[tuple[TopClass, ...], ...] = field(default_factory=tuple)
    reconstruction_error: float = 0.0
    n_iter: int = 0
    n_images: int = 0

    @property
    def k(self) -> int:
        """The number of concepts."""
        return int(self.vectors.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 of the vectors (float32 bytes) and the layer: the identity of the basis
        that a resumed run must find again."""
        digest = hashlib.sha256(np.ascontiguousarray(self.vectors, dtype=np.float32).tobytes())
        digest.update(f"{self.layer}#{self.call}".encode())
        return digest.hexdigest()

    def coefficients(self, activations: torch.Tensor) -> torch.Tensor:
        """The concepts' coefficients of activations (N, C, h, w), ``W`` fixed: (N, K, h, w).

        Solves ``min_H 0.5 ||relu(A) - H W||_F^2`` with ``H >= 0`` by scikit-learn's
        ``non_negative_factorization(..., update_H=False)`` (coordinate descent; what
        ``NMF.transform`` does), row by row independent, so the result of an image does not
        depend on the other images of its batch.

        Raises:
            ConfigError: the activations do not have the basis's C channels.
        """
        n, c, h, w = activations.shape
        if c != self.vectors.shape[1]:
            raise ConfigError(
                f"the activations have {c} channels but the concepts were fitted on "
                f"{self.vectors.shape[1]} (layer {self.layer!r}); use the same model and layer"
            )
        matrix = activation_matrix(activations)
        if not matrix.any():
            return torch.zeros(n, self.k, h, w)
        coefficients = _solve_coefficients(matrix, self.vectors)
        return torch.from_numpy(coefficients).reshape(n, h, w, self.k).permute(0, 3, 1, 2)

    def transform(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        """Raw concept maps (N, K, h, w) of a preprocessed batch ``x`` against this basis.

        Example:
            >>> import camlens
            >>> model = camlens.load_model()
            >>> fit = model.preprocess(["photos/cat.jpg", "photos/coffee.jpg"])
            >>> basis, raw = fit_concepts(model, fit, k=3)
            >>> basis.transform(model, model.preprocess("photos/astronaut.jpg")).shape
            torch.Size([1, 3, 7, 7])
        """
        activations, _ = capture_activations(classifier, x, layer=self.layer, call=self.call)
        return self.coefficients(activations)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The basis as arrays for ``np.savez`` (the metadata as one JSON string)."""
        meta = {
            "layer": self.layer,
            "call": self.call,
            "top_classes": [[t.to_dict() for t in top] for top in self.top_classes],
            "reconstruction_error": self.reconstruction_error,
            "n_iter": self.n_iter,
            "n_images": self.n_images,
        }
        return {"vectors": self.vectors, "peaks": self.peaks, "meta": np.array(json.dumps(meta))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ConceptBasis:
        """The basis saved by :meth:`to_arrays` (e.g. read back with ``np.load``)."""
        meta = json.loads(str(arrays["meta"]))
        top = tuple(
            tuple(TopClass(int(t["class"]), str(t["label"]), float(t["prob"])) for t in row)
            for row in meta["top_classes"]
        )
        return cls(
            vectors=np.asarray(arrays["vectors"], dtype=np.float32),
            peaks=np.asarray(arrays["peaks"], dtype=np.float32),
            layer=meta["layer"],
            call=int(meta["call"]),
            top_classes=top,
            reconstruction_error=float(meta["reconstruction_error"]),
            n_iter=int(meta["n_iter"]),
            n_images=int(meta["n_images"]),
        )


def capture_activations(
    classifier: Classifier, x: torch.Tensor, *, layer: str | None = None, call: int | None = None
) -> tuple[torch.Tensor, CamHead]:
    """The ReLU'd output of the feature layer for the batch ``x``: (N, C, h, w) float32 on CPU.

    Parameters:
        classifier: the model (its module and how to read its logits).
        x: a preprocessed batch (N, 3, H, W).
        layer: qualified name of the layer (default: the classifier's, else the layer that
            feeds global average pooling, ``camlens.layers.find_cam_head``).
        call: which call of the layer, for modules that run several times (default: the last).

    Returns:
        ``(activations, head)``: the activations and the head found for the layer.

    Raises:
        ConfigError: unknown layer, a layer whose output is not a feature map (N, C, h, w), a
            TorchScript model (no hooks), or ``x`` that is not an image batch.
    """
    module = classifier.module
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(TORCHSCRIPT_NOT_HOOKABLE.format(name="this model", path="FILE"))
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ConfigError(
            f"expected a preprocessed image batch (N, C, H, W), got {getattr(x, 'shape', type(x))}"
        )
    x = x.to(device=classifier.device)
    with preserved_state(module):
        head = cached_cam_head(
            module, x, layer=layer or classifier.layer, call=call, output=classifier.output
        )
        with LayerCapture(get_layer(module, head.feature_layer), call=head.call) as capture:
            with torch.inference_mode():
                module(x)
            activation = capture.activation
    if activation.ndim != 4:
        raise ConfigError(
            f"layer {head.feature_layer!r} returns shape {tuple(activation.shape)}, not a "
            "feature map (N, C, h, w); choose a convolutional layer (--layer / layer=)"
        )
    return activation.detach().float().relu().cpu(), head


def activation_matrix(activations: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) -> the NMF matrix (N*h*w, C), float32, rows in (image, row, column) order;
    negative values (if any) set to 0."""
    n, c, h, w = activations.shape
    matrix = activations.float().relu().permute(0, 2, 3, 1).reshape(n * h * w, c)
    return np.ascontiguousarray(matrix.cpu().numpy())


def nmf_factorize(
    matrix: np.ndarray, k: int, *, random_state: int = RANDOM_STATE
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``matrix ≈ coefficients @ vectors`` by scikit-learn's NMF (no rescaling, no ordering).

    Parameters:
        matrix: (M, C) non-negative.
        k: the number of components, 1 <= k <= min(M, C).
        random_state: the seed of the initialisation.

    Returns:
        ``(coefficients (M, K), vectors (K, C), reconstruction_error, n_iter)``.

    Example:
        >>> m = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
        >>> h, w, error, _ = nmf_factorize(m, 2)
        >>> bool(np.allclose(h @ w, m, atol=1e-3)), error < 1e-3
        (True, True)
    """
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    rows, channels = matrix.shape
    if not 1 <= k <= min(rows, channels):
        raise ConfigError(
            f"cannot find k={k} concepts in {rows} positions x {channels} channels: k must be "
            f"between 1 and {min(rows, channels)}; use a smaller k or more fit images"
        )
    if not matrix.any():
        raise ConfigError(
            "the layer's activations are all zero on the fit images, so there is nothing to "
            "factorise; check the images, the model's weights and the layer"
        )
    model = NMF(n_components=k, init="nndsvda", random_state=random_state, max_iter=NMF_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        coefficients = model.fit_transform(matrix)
    return coefficients, model.components_, float(model.reconstruction_err_), int(model.n_iter_)


def _solve_coefficients(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Non-negative coefficients (M, K) of ``matrix`` (M, C) on fixed ``vectors`` (K, C)."""
    from sklearn.decomposition import non_negative_factorization
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        coefficients, _, _ = non_negative_factorization(
            matrix,
            H=np.asarray(vectors, dtype=matrix.dtype),
            n_components=vectors.shape[0],
            init="custom",
            update_H=False,
            solver="cd",
            max_iter=NMF_MAX_ITER,
            tol=TRANSFORM_TOL,
        )
    return coefficients.astype(np.float32)


def fit_concepts(
    classifier: Classifier,
    x: torch.Tensor | Iterable[torch.Tensor],
    k: int = 5,
    *,
    layer: str | None = None,
    top: int = 3,
    random_state: int = RANDOM_STATE,
) -> tuple[ConceptBasis, torch.Tensor]:
    """Fit K concepts on the images ``x``: the basis and the images' raw maps (N, K, h, w).

    Parameters:
        classifier: the model.
        x: a preprocessed batch (N, 3, H, W), or several batches (decoded and run one at a
            time; their activations are factorised together).
        k: the number of concepts.
        layer: the layer (default: the one that feeds global average pooling).
        top: the number of classes to keep per concept.
        random_state: the seed of the NMF initialisation.

    Returns:
        ``(basis, raw)``: the ``ConceptBasis`` and the fit images' coefficients
        (N, K, h, w), from the factorisation itself (``H``, rescaled with the unit vectors).

    Raises:
        ConfigError: k out of range, no image, an unknown layer, all-zero activations.

    Example:
        >>> import camlens
        >>> model = camlens.load_model()
        >>> x = model.preprocess(["photos/cat.jpg", "photos/coffee.jpg"])
        >>> basis, raw = fit_concepts(model, x, k=2)
        >>> basis.vectors.shape, raw.shape
        ((2, 1280), torch.Size([2, 2, 7, 7]))
        >>> [top[0].label for top in basis.top_classes]  # the two photos' two concepts
        ['Egyptian cat', 'espresso']
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (the number of concepts) must be an integer >= 1, got {k!r}")
    batches = [x] if isinstance(x, torch.Tensor) else list(x)
    if not batches:
        raise ConfigError("no images to fit the concepts on")
    captured = [capture_activations(classifier, batch, layer=layer) for batch in batches]
    head = captured[-1][1]
    activations = torch.cat([a for a, _ in captured])
    n, _, h, w = activations.shape
    coefficients, vectors, error, n_iter = nmf_factorize(
        activation_matrix(activations), k, random_state=random_state
    )
    vectors, coefficients = _unit_and_ordered(vectors, coefficients)
    peaks = coefficients.max(axis=0).astype(np.float32)
    basis = ConceptBasis(
        vectors=vectors,
        peaks=peaks,
        layer=head.feature_layer,
        call=head.call,
        top_classes=classify_concepts(classifier, head, vectors * peaks[:, None], top),
        reconstruction_error=error,
        n_iter=n_iter,
        n_images=n,
    )
    raw = torch.from_numpy(coefficients).reshape(n, h, w, k).permute(0, 3, 1, 2).contiguous()
    return basis, raw


def _unit_and_ordered(
    vectors: np.ndarray, coefficients: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale to unit-norm vectors (the product ``H W`` is unchanged) and order the concepts
    by total coefficient, largest first (ties: the factorisation's order)."""
    norms = np.linalg.norm(vectors, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    vectors = vectors / norms[:, None]
    coefficients = coefficients * norms[None, :]
    order = np.argsort(-coefficients.sum(axis=0), kind="stable")
    return (
        np.ascontiguousarray(vectors[order], dtype=np.float32),
        np.ascontiguousarray(coefficients[:, order], dtype=np.float32),
    )


def classify_concepts(
    classifier: Classifier, head: CamHead, concepts: np.ndarray, top: int
) -> tuple[tuple[TopClass, ...], ...]:
    """The ``top`` classes of each concept (K, C): softmax of the classifier's final linear
    layer applied to it; empty tuples when that layer does not take C features (the concepts
    come from a layer that does not feed it)."""
    linear = get_layer(classifier.module, head.classifier) if head.classifier else None
    if not isinstance(linear, nn.Linear) or linear.in_features != concepts.shape[1] or top < 1:
        return tuple(() for _ in range(len(concepts)))
    weight = linear.weight.detach().float().cpu()
    bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
    with torch.no_grad():
        logits = nn.functional.linear(torch.from_numpy(concepts).float(), weight, bias)
    best = logits.softmax(dim=1).topk(min(top, logits.shape[1]), dim=1)
    return tuple(
        tuple(
            TopClass(int(c), _label(classifier.labels, int(c)), float(p))
            for p, c in zip(probs.tolist(), ids.tolist(), strict=True)
        )
        for probs, ids in zip(best.values, best.indices, strict=True)
    )


def _label(labels: Sequence[str], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


def concept_shares(raw: torch.Tensor) -> torch.Tensor:
    """Each concept's share of an image's map mass: (N, K, h, w) -> (N, K), rows summing to 1
    (rows of zeros for an image without any concept).

    Example:
        >>> concept_shares(torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]]))
        tensor([[0.5000, 0.5000]])
    """
    mass = raw.float().relu().sum(dim=(-2, -1))
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))
