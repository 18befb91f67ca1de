"""The one place where maps are built: hooks, forward, weighted sum. Methods supply weights.

Contract of every method: ``raw = method(x, targets)`` returns float32 maps (N, K, h, w) at
the feature layer's resolution, *signed and un-normalised*: no ReLU, no upsampling, no
rescaling. ``Explanation.maps`` derives the [0, 1] input-size maps from them. Conv3d models
take volumes (N, C, D, H, W) and give (N, K, d, h, w) maps, with the methods whose class sets
``volumes`` (``volume_methods()``: CAM and the gradient family); the others refuse volumes.

Methods only ever see (N, C, h, w) feature maps: a transformer layer's tokens (N, T, C) or
channels-last maps (N, h, w, C) are converted here, once, by the capture
(``CamHead.layout``, found by ``camlens.layers.find_cam_head``; see ``camlens.tokens``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import LayerCapture, get_layer, preserved_state
from camlens.layers import CamHead, Reshape, cached_cam_head
from camlens.methods.linalg import weighted_first_component
from camlens.models.checkpoints import TORCHSCRIPT_NOT_HOOKABLE
from camlens.models.outputs import OutputSpec, select_logits
from camlens.targets import Similarity, Target, resolve_targets
from camlens.tokens import Layout, ReshapeLayout

LayerSpec = str | Sequence[str] | None

#: ``aug_smooth``'s test-time augmentations, as pytorch-grad-cam's default ``tta_transforms``
#: (ttach's ``HorizontalFlip()`` x ``Multiply([0.9, 1, 1.1])``): (flip horizontally, factor
#: that multiplies the input's values). The identity comes first: its pass gives the logits.
AUGMENTATIONS: tuple[tuple[bool, float], ...] = (
    (False, 1.0),
    (False, 0.9),
    (False, 1.1),
    (True, 0.9),
    (True, 1.0),
    (True, 1.1),
)


@dataclass
class MethodResult:
    """Everything one call of a method produced.

    Attributes:
        raw: (N, K, h, w) float32 signed maps at feature resolution.
        logits: (N, classes) the model's scores for the batch.
        targets: (N, K) long, the explained classes.
        layer: qualified name of the layer the maps come from (several layers fused:
            their names joined by commas).
        identity_error: for CAM, max |mean(M_c) + b_c - y_c| over the batch; else None (and
            None with ``eigen_smooth`` or ``aug_smooth``, whose maps do not decompose ``y_c``).
        scores: (N, K) float32 scores of targets that are not classes (a
            ``camlens.targets.Similarity``: the cosine similarity of the input's embedding with
            the reference's), whose ``targets`` are ``NOT_A_CLASS``; None for class targets
            (their scores are the logits).
        target_labels: the names of the K targets when they are not classes
            (``("similar:ref.png",)``); None for class targets.
    """

    raw: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layer: str
    identity_error: float | None = None
    scores: torch.Tensor | None = None
    target_labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Step:
    """One forward pass with the feature layer(s) captured: what a method's maps come from.

    ``CAMMethod`` builds it and passes it to ``compute_raw(step)``, ``channel_weights(step)``
    and ``fuse_layers(step)``.

    Attributes:
        x: (N, C, H, W) the input batch (a noisy copy of it when smoothing).
        activations: the captured layer outputs (N, C_l, h_l, w_l), one per explained layer,
            in the order of the heads (one unless the method fuses layers). For gradient
            methods they are the leaves that ``CAMMethod.target_gradients`` differentiates to.
        logits: (N, classes) the model's scores, still in the graph for gradient methods.
        targets: (N, K) long, the explained classes (``NOT_A_CLASS`` for a similarity).
        scores: with a ``similarity`` target, its (N, 1) float32 scores ``cos(e(x), e(r))``,
            in the graph for gradient methods: what they differentiate instead of a logit
            (``target_gradients(..., scores=step.scores)``); None for class targets.
        similarity: the ``camlens.targets.Similarity`` target, or None; perturbation methods
            score their perturbed inputs with it (``CAMMethod.similarity_of``).
    """

    x: torch.Tensor
    activations: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor | None = None
    similarity: Similarity | None = None

    @property
    def activation(self) -> torch.Tensor:
        """The (last) explained layer's output ``A``: (N, C, h, w)."""
        return self.activations[-1]


class _ChainedCapture(LayerCapture):
    """A ``LayerCapture`` that keeps a layer downstream of another captured layer in the graph.

    With several layers captured in one forward pass, the first one reached becomes the
    gradient leaf; a later layer whose output already depends on it must not be detached,
    or the gradient could not flow back to the earlier layer.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        call: int = -1,
        track_gradients: bool = False,
        layout: Layout | ReshapeLayout | None = None,
    ):
        super().__init__(layer, call=call, track_gradients=track_gradients, layout=layout)
        self.wants_gradients = track_gradients

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        in_graph = isinstance(output, torch.Tensor) and output.requires_grad
        self.track_gradients = self.wants_gradients and not in_graph
        return super()._hook(module, inputs, output)


class CAMMethod:
    """Base of every map method: subclasses implement ``channel_weights(step)`` only.

    ``raw[n, k] = sum_c weights[n, k, c] * A[n, c]`` where ``A`` is the feature layer's
    output. Every extension point receives one ``Step`` (input, captured activations, logits,
    targets); a method that is not a channel-weighted sum overrides ``compute_raw(step)``
    instead, and one that fuses layers ``fuse_layers(step)``. Hooks are attached for the
    duration of each call and always removed; the model's train/eval flags and
    ``requires_grad`` are restored; the caller may be inside ``torch.no_grad()``.

    Parameters:
        module: the classifier (``nn.Module``).
        layer: qualified name of the feature layer; ``None`` finds the layer that feeds global
            average pooling (see ``camlens.layers.find_cam_head``). Methods that fuse layers
            (``fuses_layers``, Layer-CAM) also take a list of names, or one comma-separated
            string.
        call: which call of the layer to use when the module runs several times per forward
            (-1, the default, is the last one).
        output: how to pick the logits from the model's output (tuple, dict...).
        labels: class names, for targets given by name.
        smooth: gradient methods only: average the raw maps over this many noisy copies of
            the input (SmoothGrad-style, Smilkov et al. 2017); 0 (default) = no smoothing.
            The targets are resolved once, on the clean input; ``logits`` are the clean ones.
        smooth_sigma: standard deviation of the Gaussian noise, as a fraction of each image's
            value range ``max(x_n) - min(x_n)`` (0.15, SmoothGrad's recommended level).
        eigen_smooth: channel-weighted methods only (``eigen_smooth_applies``: those whose map
            is ``sum_k w_k A_k``, e.g. cam, gradcam, gradcam++, xgradcam): replace each
            (image, target) map by the projection of its weighted activations ``w_k A_k``
            (an (h w, C) matrix, centred) on their first principal component, as
            pytorch-grad-cam's ``eigen_smooth``. The sign is chosen so that the map correlates
            positively with the plain map it replaces (``linalg.weighted_first_component``).
            Methods that compute their maps otherwise (hirescam, layercam, eigencam, random,
            and scorecam / ablationcam, which override ``compute_raw``) refuse it.
        aug_smooth: average the raw maps over the input flipped horizontally or not, times
            0.9, 1 and 1.1 (``AUGMENTATIONS``, pytorch-grad-cam's ``aug_smooth``): each map of
            a flipped copy is flipped back; the targets are the clean input's and ``logits``
            the clean ones. Six passes (each one smoothed too with ``smooth``). Refused by
            methods whose maps do not follow the input (``aug_smooth_applies``: random).
        reshape: a function mapping the layer's output to (N, C, h, w) feature maps, for the
            exotic layouts that camlens does not recognise by itself. Tokens (N, T, C) and
            channels-last maps (N, h, w, C) of timm and torchvision transformers need none: the
            layout is found from the traced forward pass (``camlens.tokens.infer_layout``:
            the grid from the token count and the input size, prefix tokens such as CLS
            dropped), and a layer whose layout cannot be determined is refused. ``fn`` must
            only select and rearrange entries (slicing, ``reshape``, ``permute``): gradients
            are mapped back through it (``camlens.tokens.ReshapeLayout``).

    Example:
        >>> from torch import nn
        >>> from camlens.methods import CAM, GradCAM
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        >>> x = torch.rand(2, 3, 16, 16)
        >>> with GradCAM(model) as method:
        ...     raw = method(x, "top1")
        >>> raw.shape  # (N, K, h, w), signed and un-normalised, at the feature layer's size
        torch.Size([2, 1, 16, 16])
        >>> method.head.feature_layer, method.head.classifier  # found automatically
        ('1', '4')
        >>> torch.allclose(CAM(model)(x), raw * 16 * 16, atol=1e-5)  # GAP + FC: Grad-CAM x hw
        True
        >>> smooth = GradCAM(model, smooth=8)(x, "top1")  # noise from torch's global RNG
        >>> smooth.shape
        torch.Size([2, 1, 16, 16])
    """

    name: ClassVar[str] = "base"
    needs_gradients: ClassVar[bool] = False
    fuses_layers: ClassVar[bool] = False
    #: Whether the maps are ``weighted_sum(channel_weights, feature_maps)``, so that
    #: ``eigen_smooth`` has weighted activations to project. Set for each subclass from where
    #: ``compute_raw`` comes from: the base's (a channel-weighted sum: True) or an override
    #: (False, unless the class that overrides it sets True and calls ``weighted_sum``).
    eigen_smooth_applies: ClassVar[bool] = True
    #: Whether averaging the maps of flipped / brightened copies of the input means anything
    #: (False for maps that do not depend on the input, e.g. the random baseline).
    aug_smooth_applies: ClassVar[bool] = True
    #: Whether the method explains 3-D inputs (N, C, D, H, W) of Conv3d models, whose feature
    #: maps are (N, C, d, h, w): its formula treats the spatial dimensions generally. Other
    #: methods refuse a volume (``volume_methods`` lists those that explain one).
    volumes: ClassVar[bool] = False
    #: Whether the method explains a ``camlens.targets.Similarity`` target: its maps come from
    #: ``Step.scores`` (gradients: ``target_gradients(..., scores=step.scores)``; perturbations:
    #: ``similarity_of``) or do not depend on the target. False: refused with
    #: ``similarity_refusal`` and the names of the methods that can.
    score_targets: ClassVar[bool] = False
    #: Whether the map of a class depends on the other classes' scores (Finer-CAM's
    #: comparison classes, Shapley-CAM's softmax utilities): such a method cannot explain a
    #: detector's or segmenter's targets (``camlens.dense``), which are scores of their own.
    compares_classes: ClassVar[bool] = False
    #: Why a method with ``score_targets = False`` cannot explain a similarity.
    similarity_refusal: ClassVar[str] = (
        "it computes the classes' scores itself and does not take another score"
    )
    #: How a reference image of a ``Similarity`` target becomes a model input (1, C, H, W)
    #: when the target has no ``preprocess`` of its own: ``make_method`` sets the
    #: Classifier's preprocessing here.
    preprocess: Callable[[Any], torch.Tensor] | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "eigen_smooth_applies" not in vars(cls):
            owner = next(k for k in cls.__mro__ if "compute_raw" in vars(k))
            cls.eigen_smooth_applies = owner is CAMMethod or (
                owner is not cls and bool(vars(owner).get("eigen_smooth_applies", False))
            )

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        call: int = -1,
        output: OutputSpec = None,
        labels: Sequence[str] | None = None,
        smooth: int = 0,
        smooth_sigma: float = 0.15,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        reshape: Reshape | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{type(self).__name__} needs an nn.Module, got {type(module)}")
        if isinstance(module, torch.jit.ScriptModule):
            raise ConfigError(TORCHSCRIPT_NOT_HOOKABLE.format(name="this model", path="FILE"))
        for name in self._layer_names(layer):
            get_layer(module, name)
        if smooth < 0 or smooth_sigma < 0:
            raise ConfigError(
                f"smooth and smooth_sigma must be >= 0, got smooth={smooth}, "
                f"smooth_sigma={smooth_sigma}"
            )
        if smooth and not self.needs_gradients:
            raise ConfigError(
                f"smooth={smooth}: noise smoothing applies to gradient methods (those that "
                f"use gradients); {self.name} does not use gradients"
            )
        if eigen_smooth and not self.eigen_smooth_applies:
            raise ConfigError(
                f"eigen_smooth: {self.name} is not a channel-weighted sum sum_k w_k A_k (it "
                "computes its maps otherwise), so there are no weighted activations to project; "
                "it applies to channel-weighted methods such as cam, gradcam, gradcam++, xgradcam"
            )
        if aug_smooth and not self.aug_smooth_applies:
            raise ConfigError(
                f"aug_smooth: the maps of {self.name} do not depend on the input's content, so "
                "averaging them over flipped and brightened copies of the input means nothing"
            )
        self.module = module
        self.layer = layer
        self.call = call
        self.output = output
        self.labels = labels
        self.smooth = smooth
        self.smooth_sigma = smooth_sigma
        self.eigen_smooth = bool(eigen_smooth)
        self.aug_smooth = bool(aug_smooth)
        if reshape is not None and not callable(reshape):
            raise ConfigError(
                f"reshape must be a function mapping the layer's output to (N, C, h, w) maps, "
                f"got {type(reshape).__name__}"
            )
        self.reshape = reshape
        self.head: CamHead | None = None
        self.heads: list[CamHead] | None = None
        self.layer_calls = 0  # how often the (last) feature layer ran in the last forward
        # (target, key, (1, D) embedding): a Similarity's reference, computed once per key
        self._reference: tuple[Similarity, tuple[Any, ...], torch.Tensor] | None = None

    def _layer_names(self, layer: LayerSpec) -> list[str]:
        """The layer names asked for: ``"a,b"`` (as ``MethodResult.layer`` writes several
        layers, and as a command line passes them) is the same as ``["a", "b"]``."""
        if layer is None:
            return []
        names = [n.strip() for n in layer.split(",")] if isinstance(layer, str) else list(layer)
        if not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"layer must be a name or a non-empty list of names, got {layer!r}")
        if len(names) > 1 and not self.fuses_layers:
            raise ConfigError(
                f"{self.name} explains one layer, got {names}; only layercam fuses several layers"
            )
        return names

    def __enter__(self) -> CAMMethod:
        return self

    def __exit__(self, *exc: object) -> None:
        # Hooks live only inside each call; nothing stays attached between calls.
        return None

    def __call__(self, x: torch.Tensor, targets: Target = "top1") -> torch.Tensor:
        return self.run(x, targets).raw

    def run(self, x: torch.Tensor, targets: Target = "top1") -> MethodResult:
        """Compute the raw maps of ``targets`` for the batch ``x`` (N, C, H, W), or for a
        batch of volumes (N, C, D, H, W) with a method that explains them (``volumes``)."""
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            raise ConfigError(
                "expected an image batch (N, C, H, W) or a volume batch (N, C, D, H, W), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.ndim == 5:
            self.check_volumes()
        if x.is_inference():
            x = x.clone()
        similarity = self.similarity_target(targets)
        with preserved_state(self.module):
            heads = self.resolve_heads(x)
            if self.aug_smooth:
                raw, logits, ids = self._augmented(x, targets)
            else:
                raw, logits, ids = self._explain(x, targets)
            scores = None if similarity is None else self.similarity_of(x, similarity)
        result = MethodResult(
            raw=raw.detach().float(),
            logits=logits.detach(),
            targets=ids,
            layer=",".join(h.feature_layer for h in heads),
            scores=scores,
            target_labels=None if similarity is None else (similarity.label,),
        )
        if not (self.eigen_smooth or self.aug_smooth):  # else not the method's own map
            self.check(result)
        return result

    def check_volumes(self) -> None:
        """Refuse a volume batch when this method (or its options) cannot explain one.

        Raises:
            ConfigError: naming the method and the methods that explain volumes.
        """
        if not self.volumes:
            raise ConfigError(
                f"{self.name} cannot explain a 3-D volume (N, C, D, H, W): its maps are built "
                "for 2-D feature maps (h, w); methods that explain volumes: "
                f"{', '.join(volume_methods())}"
            )
        if self.eigen_smooth or self.aug_smooth:
            raise ConfigError(
                f"{self.name} on a 3-D volume: eigen_smooth and aug_smooth are not supported "
                "for volumes; leave them off"
            )

    def _explain(
        self, x: torch.Tensor, targets: Target
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The maps of ``x``, smoothed over noisy copies when ``smooth`` is set."""
        return self._smoothed(x, targets) if self.smooth else self._explain_once(x, targets)

    def _augmented(
        self, x: torch.Tensor, targets: Target
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean raw map over ``AUGMENTATIONS`` of ``x`` (flipped maps flipped back), for the
        clean input's targets; the logits are the clean input's (the identity's pass)."""
        total, logits, ids, fixed = None, None, targets, targets
        for flip, factor in AUGMENTATIONS:
            augmented = x if factor == 1 else x * factor
            augmented = augmented.flip(-1) if flip else augmented
            raw, pass_logits, pass_ids = self._explain(augmented, fixed)
            if logits is None:  # the first augmentation is the identity
                logits, ids = pass_logits, pass_ids
                fixed = targets if isinstance(targets, Similarity) else ids
            raw = raw.flip(-1) if flip else raw
            total = raw if total is None else total + raw
        return total / len(AUGMENTATIONS), logits, ids

    def _explain_once(
        self, x: torch.Tensor, targets: Target
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass with the feature layer(s) captured, then the method's maps."""
        captures = [
            _ChainedCapture(
                get_layer(self.module, h.feature_layer),
                call=h.call_index,
                track_gradients=self.needs_gradients,
                layout=h.layout,
            )
            for h in self.heads
        ]
        similarity = targets if isinstance(targets, Similarity) else None
        embedding = None if similarity is None else self.embedding_capture(similarity, x)
        grad_context = torch.no_grad() if self.needs_gradients else torch.inference_mode()
        with contextlib.ExitStack() as stack:
            for capture in captures:
                stack.enter_context(capture)
            if embedding is not None:
                stack.enter_context(embedding)
            stack.enter_context(grad_context)
            logits = select_logits(self.module(x), self.output)
        self.layer_calls = captures[-1].n_calls
        ids = resolve_targets(targets, logits.detach(), self.labels)
        scores = None if embedding is None else self._similarity_scores(similarity, embedding, x)
        activations = tuple(capture.activation for capture in captures)
        step = Step(x, activations, logits, ids, scores, similarity)
        raw = self.compute_raw(step) if len(step.activations) == 1 else self.fuse_layers(step)
        return raw.detach().float(), logits, ids

    def _smoothed(
        self, x: torch.Tensor, targets: Target
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean raw map over ``smooth`` noisy copies of ``x``, for the clean input's targets."""
        with torch.inference_mode():
            logits = select_logits(self.module(x), self.output)
        ids = resolve_targets(targets, logits, self.labels)
        flat = x.flatten(1)
        spread = (flat.amax(dim=1) - flat.amin(dim=1)).float()
        sigma = (self.smooth_sigma * spread).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        total = None
        for _ in range(self.smooth):
            noisy = x + torch.randn_like(x) * sigma
            raw = self._explain_once(noisy, targets if isinstance(targets, Similarity) else ids)[0]
            total = raw if total is None else total + raw
        return total / self.smooth, logits, ids

    def similarity_target(self, targets: Target) -> Similarity | None:
        """``targets`` when it is a ``camlens.targets.Similarity`` this method can explain;
        None for class targets.

        Raises:
            ConfigError: a similarity for a method that cannot explain one (``score_targets``
                False, e.g. CAM), naming the reason and the methods that can.
        """
        if not isinstance(targets, Similarity):
            return None
        if not self.score_targets:
            raise ConfigError(
                f"{self.name} cannot explain the similarity target {targets.label!r}: "
                f"{self.similarity_refusal}. Methods that explain a similarity: "
                f"{', '.join(similarity_methods())}"
            )
        return targets

    def embedding_layer(self, target: Similarity) -> tuple[str, bool]:
        """``(layer name, inputs)``: where ``target``'s embedding is read: the output of its
        ``layer``, or (``inputs`` True) the input of the classifier's final linear layer
        (``CamHead.classifier``, found with the feature layer).

        Raises:
            ConfigError: no such layer, or no final linear layer found and no ``layer`` given.
        """
        if target.layer is not None:
            get_layer(self.module, target.layer)
            return target.layer, False
        classifier = self.head.classifier if self.head is not None else None
        if classifier is None:
            raise ConfigError(
                f"similarity target {target.label!r}: no final linear layer was found in this "
                "model, whose input (the pooled features) is the default embedding; name the "
                'layer whose output is the embedding: Similarity(reference, layer="...")'
            )
        return classifier, True

    def embedding_capture(self, target: Similarity, x: torch.Tensor) -> EmbeddingCapture:
        """A fresh ``EmbeddingCapture`` of ``target``'s embedding layer, after computing the
        reference's embedding for inputs like ``x`` (``reference_embedding``)."""
        self.reference_embedding(target, x)
        name, inputs = self.embedding_layer(target)
        return EmbeddingCapture(get_layer(self.module, name), name, inputs=inputs)

    def reference_embedding(self, target: Similarity, x: torch.Tensor) -> torch.Tensor:
        """(1, D) float32 embedding ``e(r)`` of ``target``'s reference: one forward pass
        without gradients, on ``x``'s device and dtype, kept for the next calls with the same
        target, layer, device and dtype."""
        name, inputs = self.embedding_layer(target)
        key = (name, inputs, x.device, x.dtype)
        cached = self._reference
        if cached is not None and cached[0] is target and cached[1] == key:
            return cached[2]
        batch = target.reference_input(self.preprocess, x.device, x.dtype)
        capture = EmbeddingCapture(get_layer(self.module, name), name, inputs=inputs)
        with preserved_state(self.module), capture, torch.no_grad():
            select_logits(self.module(batch), self.output)
        reference = target.embed(capture.embedding).detach()
        self._reference = (target, key, reference)
        return reference

    def similarity_of(self, x: torch.Tensor, target: Similarity) -> torch.Tensor:
        """(N, 1) float32 ``cos(e(x), e(r))`` of a batch ``x`` (one forward pass without
        gradients; the hooks the caller holds, e.g. Ablation-CAM's, stay active): the score
        that perturbation methods read for their perturbed inputs."""
        capture = self.embedding_capture(target, x)
        with capture, torch.no_grad():
            select_logits(self.module(x), self.output)
        return target.score(target.embed(capture.embedding), self.reference_embedding(target, x))

    def _similarity_scores(
        self, target: Similarity, capture: EmbeddingCapture, x: torch.Tensor
    ) -> torch.Tensor:
        """(N, 1) ``cos(e(x), e(r))`` of the forward pass just captured, in the graph for
        gradient methods (whose leaves are the feature layer's outputs)."""
        with torch.enable_grad() if self.needs_gradients else contextlib.nullcontext():
            scores = target.score(
                target.embed(capture.embedding), self.reference_embedding(target, x)
            )
        if self.needs_gradients and not scores.requires_grad:
            raise ConfigError(
                f"similarity target {target.label!r}: its embedding (layer {capture.name!r}) "
                "does not depend on the explained feature layer "
                f"{self.head.feature_layer if self.head else '?'!r}, so it has no gradient "
                "there; take the embedding from a layer after it (or the default: the "
                "classifier's input)"
            )
        return scores

    def resolve_heads(self, x: torch.Tensor) -> list[CamHead]:
        """The heads of every explained layer (one unless the method fuses layers).

        Looked up on every call in ``camlens.layers.cached_cam_head``: the model is traced
        once per module, layer and input shape (also across method instances, as
        ``camlens.explain`` builds one per call), and again only after the module's structure
        changed (``camlens.layers.module_structure``).
        """
        names = self._layer_names(self.layer)
        if len(names) > 1:
            self.heads = [
                cached_cam_head(
                    self.module,
                    x,
                    layer=n,
                    call=self.call,
                    output=self.output,
                    reshape=self.reshape,
                )
                for n in names
            ]
            self.head = self.heads[-1]
        else:
            self.heads = [self.resolve_head(x)]
        return self.heads

    def resolve_head(self, x: torch.Tensor) -> CamHead:
        """The feature layer, and the classifier when the method needs it (``find_cam_head``,
        cached per module while its structure does not change: ``cached_cam_head``)."""
        names = self._layer_names(self.layer)
        layer = names[0] if names else None
        self.head = cached_cam_head(
            self.module, x, layer=layer, call=self.call, output=self.output, reshape=self.reshape
        )
        return self.head

    def compute_raw(self, step: Step) -> torch.Tensor:
        """(N, K, h, w) raw maps of one layer's ``step``.

        Default: ``weighted_sum(channel_weights(step), feature_maps(step.activation))``.
        Methods that are not a channel-weighted sum (element-wise gradients, projections,
        perturbations that need the input ``step.x``) override this instead of
        ``channel_weights``.
        """
        return self.weighted_sum(self.channel_weights(step), self.feature_maps(step.activation))

    def weighted_sum(self, weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """``combine(weights, activation)``, or with ``eigen_smooth`` the first principal
        component of the weighted activations (``linalg.weighted_first_component``): (N, K, C)
        x (N, C, h, w) -> (N, K, h, w)."""
        if self.eigen_smooth:
            return weighted_first_component(weights, activation)
        return self.combine(weights, activation)

    def fuse_layers(self, step: Step) -> torch.Tensor:
        """(N, K, h, w) maps fused from ``step.activations``, several layers' outputs
        (methods with ``fuses_layers``)."""
        raise NotImplementedError

    def feature_maps(self, activation: torch.Tensor) -> torch.Tensor:
        """The maps that the channel weights multiply (the layer's output by default)."""
        return activation

    @staticmethod
    def combine(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """Weighted sum over channels: (N, K, C) x (N, C, *spatial) -> (N, K, *spatial)
        (spatial: (h, w), or (d, h, w) for a volume)."""
        return torch.einsum("nkc,nc...->nk...", weights.to(activation.dtype), activation)

    def channel_weights(self, step: Step) -> torch.Tensor:
        """Return (N, K, C) weights of the channels of ``step.activation`` for each of
        ``step.targets``."""
        raise NotImplementedError

    def check(self, result: MethodResult) -> None:
        """Hook for methods that verify their result (CAM checks its exactness)."""

    @staticmethod
    def target_gradients(
        activation: torch.Tensor | Sequence[torch.Tensor],
        logits: torch.Tensor,
        targets: torch.Tensor,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """d y_target / d A for each target: (N, K, C, h, w).

        One backward pass per target column, each reaching only down to ``activation``
        (``torch.autograd.grad`` with respect to the layer output; parameters' ``.grad`` are
        never written). Given a list of layer outputs, returns one such tensor per layer, from
        the same backward passes. ``scores`` (N, K), in the graph: differentiate these instead
        of the targets' logits (``Step.scores`` of a similarity target; None: the logits).
        """
        layers = [activation] if isinstance(activation, torch.Tensor) else list(activation)
        if not all(a.requires_grad for a in layers):
            raise ConfigError("gradients were requested but the layer output is not tracked")
        k = targets.shape[1]
        grads: list[list[torch.Tensor]] = [[] for _ in layers]
        with torch.enable_grad():  # the caller may be inside torch.no_grad()
            for j in range(k):
                if scores is None:
                    score = logits.gather(1, targets[:, j : j + 1]).sum()
                else:
                    score = scores[:, j].sum()
                per_layer = torch.autograd.grad(score, layers, retain_graph=j < k - 1)
                for store, grad in zip(grads, per_layer, strict=True):
                    store.append(grad)
        stacked = [torch.stack(g, dim=1) for g in grads]
        return stacked[0] if isinstance(activation, torch.Tensor) else stacked


class EmbeddingCapture:
    """Capture the embedding a ``camlens.targets.Similarity`` compares during a forward pass:
    the input of ``layer`` (``inputs=True``: a forward pre-hook, e.g. the classifier's pooled
    features) or its output (a forward hook; the rest of the network receives a copy, so an
    in-place operation after the layer cannot change it). The last call counts. The hook is
    attached on entry and always removed on exit, also when the forward pass raises.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 2))
        >>> with EmbeddingCapture(model[3], "3", inputs=True) as capture, torch.no_grad():
        ...     logits = model(torch.rand(2, 3, 8, 8))
        >>> capture.embedding.shape, len(model[3]._forward_pre_hooks)  # the hook is gone
        (torch.Size([2, 4]), 0)
    """

    def __init__(self, layer: nn.Module, name: str, *, inputs: bool) -> None:
        self.layer = layer
        self.name = name
        self.inputs = inputs
        self.value: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _after(self, module: nn.Module, args: object, output: object) -> object:
        if not isinstance(output, torch.Tensor):
            self.value = None
            return output
        self.value = output
        return output.clone()

    def __enter__(self) -> EmbeddingCapture:
        self.value = None
        if self.inputs:
            self._handle = self.layer.register_forward_pre_hook(self._before)
        else:
            self._handle = self.layer.register_forward_hook(self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def embedding(self) -> torch.Tensor:
        """The captured tensor (the layer's input or output in the last forward pass)."""
        if self.value is None:
            where = "input" if self.inputs else "output"
            raise ConfigError(
                f"similarity embedding: layer {self.name!r} did not run with a tensor "
                f"{where} in the forward pass; name a layer that does: "
                'Similarity(reference, layer="...")'
            )
        return self.value


def spatial_dims(tensor: torch.Tensor, leading: int) -> tuple[int, ...]:
    """The dimensions of ``tensor`` after its ``leading`` ones: (h, w) or (d, h, w) positions.

    Example:
        >>> spatial_dims(torch.zeros(1, 2, 3, 4, 5, 6), 3)
        (3, 4, 5)
    """
    return tuple(range(leading, tensor.ndim))


def _methods_with(flag: str) -> list[str]:
    """The names of the method classes whose class attribute ``flag`` is true, in the order
    the classes were defined (base and private classes left out)."""
    names: list[str] = []
    pending = list(CAMMethod.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if getattr(cls, flag) and not cls.name.startswith(("base", "_")) and cls.name not in names:
            names.append(cls.name)
    return names


def volume_methods() -> list[str]:
    """The names of the methods that explain 3-D volumes (their class has ``volumes``).

    Example:
        >>> import camlens.methods
        >>> "gradcam" in volume_methods(), "scorecam" in volume_methods()
        (True, False)
    """
    return _methods_with("volumes")


def similarity_methods() -> list[str]:
    """The names of the methods that explain a ``camlens.targets.Similarity`` target (their
    class has ``score_targets``), in the order the classes were defined.

    Example:
        >>> import camlens.methods
        >>> "gradcam" in similarity_methods(), "cam" in similarity_methods()
        (True, False)
    """
    return _methods_with("score_targets")
