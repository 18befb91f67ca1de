"""Train a CAM-ready classifier (Zhou et al. 2016) on an ImageFolder data set.

The network always ends in convolutional features -> global average pooling -> one linear
layer, so that its class activation maps are exact (see ``camlens.models.trained`` for the
recipes). Trained on image labels alone, such a network localises the objects it was never
shown boxes for, and shows the shortcuts it learned.

Training: AdamW with a cosine learning-rate schedule (per step, down to 0), light augmentation
(horizontal flip, random resized crop of 80-100 % of the area, brightness / contrast /
saturation jitter of +-20 %; plain torch ops, random numbers from a seeded generator),
validation accuracy after each epoch, and the best epoch's weights kept (highest validation
accuracy; lower validation loss breaks ties). With the same seed, data and machine, two runs
give identical weights and metrics.

Multi-label (``multilabel=True``, ``camlens train --multilabel``): the data set is a CSV file
``image,labels`` (labels separated by ``;``, see ``camlens.io.imagefolder.scan_label_csv``),
the loss is binary cross-entropy on each class's logit (``BCEWithLogitsLoss``), a class is
predicted when its sigmoid probability is at least 0.5, and the accuracies are exact-match
(subset) accuracies: the fraction of images whose predicted set of classes is exactly their
true set. The split is stratified by each image's first class. ``config.json`` records
``"multilabel": true``, so ``load_model`` gives back a multi-label ``Classifier``. After every epoch the full training state is saved
atomically, so an interrupted run continues with ``resume=True`` as if it had not stopped.

The output folder follows the rules of every camlens command (``camlens.pipeline.folder``): a
folder that is not empty is refused unless the run resumes (``resume=True``, the same
parameters, classes and data set) or replaces camlens' earlier run (``overwrite=True``: removes
exactly the files that run wrote, nothing else); nothing is created before the data set and
the parameters are checked.

Files in the output folder::

    model.safetensors    weights of the best epoch
    config.json          architecture, labels, input size, normalisation, training parameters
    metrics.json         {"epochs": [{"epoch", "train_loss", "train_accuracy", "val_accuracy",
                          "val_loss", "lr"}...], "best_epoch", "best_val_accuracy"}
    split.json           the training and validation files (relative to the data folder)
    training_state.pt    model, optimiser, schedule, epoch and random states (for resume)
    .camlens/            the run's settings and the list of files camlens wrote
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from camlens.errors import ConfigError
from camlens.io.imagefolder import (
    LABEL_SEPARATOR,
    ImageFolder,
    LoadedImages,
    load_images,
    scan_image_folder,
    scan_label_csv,
    stratified_split,
)
from camlens.layers import find_cam_head
from camlens.models.architectures import build_architecture, is_builtin
from camlens.models.devices import check_device
from camlens.models.trained import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    SIMPLE_WIDTHS,
    WEIGHTS_FILE,
    CamHead,
    TruncatedBackbone,
    build_network,
    replace_linear,
)
from camlens.pipeline import OutputFolder, spelling
from camlens.version import __version__
from camlens.writers import atomic_path, write_json

METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.json"
STATE_FILE = "training_state.pt"
OUTPUT_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, SPLIT_FILE, STATE_FILE)
#: The task name a training run records in its output folder's settings.
TASK = "train"

SIMPLE_MEAN = (0.5, 0.5, 0.5)
SIMPLE_STD = (0.25, 0.25, 0.25)
SIMPLE_SIZE = 64
SIMPLE_EPOCHS, OTHER_EPOCHS = 40, 10

# Parameters that must not change when a run is resumed (epochs and device may).
_RESUME_KEYS = (
    "backbone", "image_size", "batch_size", "lr", "weight_decay", "val_split", "seed",
    "freeze_backbone", "augment", "head_channels",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters.

    Attributes:
        backbone: ``"simple"`` (small CNN from scratch), ``"efficientnet_lite0"`` (built-in,
            ImageNet-pretrained), ``"torchvision:<name>"`` or ``"timm:<name>"`` (random
            weights).
        epochs: passes over the training set; default 40 for ``simple``, else 10.
        image_size: side of the (square) training images; default 64 for ``simple``, else
            the backbone's input size (224 for EfficientNet-Lite0).
        batch_size: images per step.
        lr: AdamW's peak learning rate; default 3e-3 when only new or randomly initialised
            layers train, 3e-4 when fine-tuning a pretrained backbone.
        weight_decay: AdamW's decoupled weight decay.
        val_split: fraction of each class held out for validation (0: none).
        seed: seeds the split, the initialisation, the batch order and the augmentation.
        freeze_backbone: train only the new head; default True for pretrained backbones and
            False for randomly initialised ones.
        augment: flips, crops and colour jitter on the training batches.
        head_channels: channels of the 3x3 convolution Zhou's recipe adds.
        device: torch device.
        multilabel: several classes per image: the data is a CSV ``image,labels``, the loss
            binary cross-entropy per class (see the module docstring).
    """

    backbone: str = "simple"
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 1e-4
    val_split: float = 0.2
    seed: int = 0
    freeze_backbone: bool | None = None
    augment: bool = True
    head_channels: int = 1024
    device: str = "cpu"
    multilabel: bool = False


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        out_dir: the model folder (``camlens.load_model(out_dir)`` loads it).
        metrics: the content of ``metrics.json``.
        n_train, n_val: images in the two sets.
        skipped: ``(path, reason)`` of the files that could not be read.
    """

    out_dir: Path
    metrics: dict[str, Any]
    n_train: int
    n_val: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def best_val_accuracy(self) -> float | None:
        return self.metrics["best_val_accuracy"]


@dataclass
class Network:
    """A freshly built CAM-ready network and how to feed it.

    Attributes:
        module: the network.
        architecture: the dictionary ``build_network`` rebuilds it from.
        head: names of the new layers (trained also when the backbone is frozen).
        pretrained: whether the backbone starts from pretrained weights.
        input_size: the backbone's natural input side.
        mean, std: input normalisation.
    """

    module: nn.Module
    architecture: dict[str, Any]
    head: list[str]
    pretrained: bool
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def make_network(backbone: str, num_classes: int, *, head_channels: int = 1024) -> Network:
    """Build a CAM-ready network with ``num_classes`` outputs on ``backbone``.

    ``"simple"`` is a ``SimpleCNN``. Any other backbone is built by ``build_architecture``:
    the built-in model with its pretrained weights, torchvision and timm architectures with
    random ones (on purpose: they train from scratch, so ``load_model``'s refusal of random
    weights does not apply). When ``find_cam_head`` says its head is already GAP + one linear
    layer (CAM-exact), that linear layer is replaced; otherwise Zhou's recipe cuts it after
    the feature layer and adds a 3x3 convolution with ``head_channels`` outputs + ReLU, GAP
    and a linear layer.

    Example:
        >>> net = make_network("torchvision:vgg11", 3)
        >>> net.architecture["recipe"], net.architecture["feature_layer"]
        ('zhou', 'features')
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least two classes, got {num_classes}")
    if backbone == "simple":
        arch = {
            "backbone": "simple",
            "recipe": "simple",
            "num_classes": num_classes,
            "widths": list(SIMPLE_WIDTHS),
        }
        return Network(
            build_network(arch), arch, ["fc"], False, SIMPLE_SIZE, SIMPLE_MEAN, SIMPLE_STD
        )
    classifier = build_architecture(backbone, pretrained=True)
    pretrained = is_builtin(backbone)  # built-ins are pretrained
    mean, std = tuple(classifier.mean), tuple(classifier.std)
    size = int(classifier.input_size[0])
    example = torch.zeros(1, 3, size, size)
    head = find_cam_head(classifier.module, example, output=classifier.output)
    if head.cam_exact:
        arch = {
            "backbone": backbone,
            "recipe": "replace-linear",
            "classifier": head.classifier,
            "num_classes": num_classes,
        }
        module = _replace(classifier.module, arch)
        return Network(module, arch, [head.classifier], pretrained, size, mean, std)
    if head.call != -1:
        raise ConfigError(
            f"the feature layer {head.feature_layer!r} of {backbone} runs more than once per "
            "forward pass, so the backbone cannot be cut after it; choose another backbone"
        )
    arch = {
        "backbone": backbone,
        "recipe": "zhou",
        "feature_layer": head.feature_layer,
        "in_channels": _channels(classifier.module, head.feature_layer, example),
        "head_channels": head_channels,
        "num_classes": num_classes,
    }
    features = TruncatedBackbone(classifier.module, head.feature_layer)
    module = CamHead(features, arch["in_channels"], num_classes, head_channels)
    return Network(module, arch, ["conv", "fc"], pretrained, size, mean, std)


def train_classifier(
    data: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    cli: bool = False,
) -> TrainResult:
    """Train a CAM-ready classifier on the ImageFolder data set ``data``; write it to ``out``.

    Parameters:
        data: a folder with one subfolder of images per class; with ``config.multilabel``, a
            CSV file ``image,labels`` (labels separated by ``;``).
        out: the model folder (see the module docstring for its files). A folder that is not
            empty is refused unless ``resume`` or ``overwrite``; nothing is created in it
            before the data set and the parameters are checked.
        config: training parameters (default ``TrainConfig()``).
        resume: continue the run in ``out`` from its last completed epoch; the parameters,
            the classes and the data set must be the same, except ``epochs`` (more epochs
            extend the run, stretching the remaining cosine schedule) and ``device``.
        overwrite: start again in ``out``: remove the files camlens wrote there before (and
            nothing else: files of yours are kept).
        progress: progress bars and one summary line per epoch on stderr.
        on_epoch_end: called with each epoch's metrics after its files are written.
        cli: error messages name command-line options (``--resume``) instead of Python
            arguments (``resume=True``); set by ``camlens train``.

    Returns:
        A ``TrainResult``.

    Raises:
        ConfigError: a bad data set (fewer than two classes, an empty class folder, a class
            whose images are all unreadable), bad parameters, an output folder the folder
            rules refuse (not empty without ``resume`` or ``overwrite``, a file, a file of
            yours where the run writes one), or a resume with other parameters, classes or
            data.

    Example:
        >>> config = TrainConfig(epochs=1, image_size=32, seed=0)
        >>> result = train_classifier("shapes/images", "model", config, progress=False)
        >>> result.n_train, result.n_val, len(result.metrics["epochs"])
        (48, 12, 1)
        >>> more = TrainConfig(epochs=2, image_size=32, seed=0)  # continue for one epoch more
        >>> result = train_classifier("shapes/images", "model", more, resume=True, progress=False)
        >>> len(result.metrics["epochs"]), round(result.best_val_accuracy, 2)
        (2, 0.5)
        >>> sorted(p.name for p in Path("model").iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['.camlens', 'config.json', 'metrics.json', 'model.safetensors', 'split.json',
         'training_state.pt']
    """
    config = _checked(config or TrainConfig())
    out = Path(out)
    output = OutputFolder(out, spell=spelling(cli, "out"))
    output.check(resume=resume, overwrite=overwrite)
    folder = _scan(data, config.multilabel, cli=cli)
    with _deterministic(config.seed):
        network = make_network(
            config.backbone, len(folder.classes), head_channels=config.head_channels
        )
        config = _with_defaults(config, network, cli=cli)
        size = (config.image_size, config.image_size)
        loaded = load_images(folder.paths, folder.targets, size, progress=progress)
        _check_loaded(loaded, folder.classes, folder.root)
        strata = loaded.targets.argmax(dim=1) if config.multilabel else loaded.targets
        train_idx, val_idx = stratified_split(strata, config.val_split, config.seed)
        parameters = _training_parameters(config, folder.root, loaded, train_idx, val_idx)
        settings = _run_settings(parameters, folder.classes, loaded, train_idx, val_idx)
        try:
            files, state = _open_output(output, settings, resume=resume, overwrite=overwrite)
            try:
                _write_run_files(
                    files, network, config, folder.classes, parameters, loaded, train_idx, val_idx
                )
                trainer = _Trainer(network, config, loaded, train_idx, val_idx, progress)
                if state is not None:
                    trainer.load_state(state)
            except Exception:
                output.discard()  # a fresh run that could not start leaves nothing behind
                raise
            metrics = trainer.fit(files, on_epoch_end)
        finally:
            output.close()
    return TrainResult(out, metrics, len(train_idx), len(val_idx), loaded.skipped)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip, resized crop and colour jitter of a uint8 batch; returns float in [0, 1].

    Per image: horizontal flip with probability 1/2; a crop of 80-100 % of the area with an
    aspect ratio in [3/4, 4/3], resized back to the full size (bilinear); brightness,
    contrast and saturation each scaled by a factor in [0.8, 1.2]. The random numbers come
    from ``generator`` (on the CPU), so a seeded generator gives the same batch on any device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_batch(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), g).shape
        torch.Size([4, 3, 64, 64])
    """
    x = images.float().div_(255.0)
    n = x.shape[0]
    r = torch.rand(n, 8, generator=generator).to(x.device)
    x = torch.where((r[:, 0] < 0.5).view(n, 1, 1, 1), x.flip(-1), x)
    area = 0.8 + 0.2 * r[:, 1]
    ratio = torch.exp((2 * r[:, 2] - 1) * math.log(4 / 3))
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2] = (2 * r[:, 3] - 1) * (1 - width)
    theta[:, 1, 2] = (2 * r[:, 4] - 1) * (1 - height)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness, contrast, saturation = (0.8 + 0.4 * r[:, i].view(n, 1, 1, 1) for i in (5, 6, 7))
    x = x * brightness
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
        1, keepdim=True
    )
    x = gray + (x - gray) * saturation
    mean = gray.mean(dim=(2, 3), keepdim=True)
    return (mean + (x - mean) * contrast).clamp_(0.0, 1.0)


class _Trainer:
    """The training loop of one run; holds everything a resume must restore."""

    def __init__(
        self,
        network: Network,
        config: TrainConfig,
        loaded: LoadedImages,
        train_idx: list[int],
        val_idx: list[int],
        progress: bool,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.module = network.module.to(self.device)
        self.head = network.head
        self.images, self.targets = loaded.images, loaded.targets
        self.train_idx = torch.tensor(train_idx, dtype=torch.long)
        self.val_idx = torch.tensor(val_idx, dtype=torch.long)
        self.progress = progress
        self.mean = torch.tensor(network.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(network.std, device=self.device).view(1, -1, 1, 1)
        trainable = self._trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, weight_decay=config.weight_decay
        )
        self.steps_per_epoch = self._steps_per_epoch()
        total = max(1, config.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        self.shuffle_rng = torch.Generator().manual_seed(config.seed)
        self.augment_rng = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "val_accuracy": None, "val_loss": None}

    def _trainable_parameters(self) -> list[nn.Parameter]:
        if self.config.freeze_backbone:
            for name, parameter in self.module.named_parameters():
                parameter.requires_grad_(any(_within(name, h) for h in self.head))
        return [p for p in self.module.parameters() if p.requires_grad]

    def _steps_per_epoch(self) -> int:
        n, size = len(self.train_idx), self.config.batch_size
        return n // size + (1 if n % size > 1 or n < 2 else 0)

    def fit(
        self, files: dict[str, Path], on_epoch_end: Callable[[dict[str, Any]], None] | None
    ) -> dict:
        epochs = self.config.epochs
        for epoch in range(self.epoch + 1, epochs + 1):
            train_loss, train_accuracy = self._train_epoch(epoch)
            val_accuracy, val_loss = self._validate()
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "val_accuracy": val_accuracy,
                "val_loss": val_loss,
                "lr": self.scheduler.get_last_lr()[0],
            }
            self.history.append(record)
            self.epoch = epoch
            improved = self._is_best(record)
            if improved:
                self.best = {k: record[k] for k in ("epoch", "val_accuracy", "val_loss")}
                _save_weights(self.module, files[WEIGHTS_FILE])
            _save_state(self.state_dict(), files[STATE_FILE])
            write_json(files[METRICS_FILE], self.metrics())
            if self.progress:
                tqdm.write(_epoch_line(record, epochs, improved))
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self.metrics()

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        self._set_mode()
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.shuffle_rng)]
        batches = [
            order[i : i + self.config.batch_size]
            for i in range(0, len(order), self.config.batch_size)
        ]
        # A batch of one image breaks batch normalisation over 1 x 1 feature maps.
        batches = [b for b in batches if len(b) > 1 or len(order) < 2]
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not self.progress)
        for batch in bar:
            x = self._inputs(self.images[batch], augment=self.config.augment)
            y = self.targets[batch].to(self.device)
            logits = self.module(x)
            loss = self._loss(logits, y, reduction="mean")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += self._correct(logits, y)
            seen += len(batch)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        return total_loss / max(seen, 1), correct / max(seen, 1)

    @torch.no_grad()
    def _validate(self) -> tuple[float | None, float | None]:
        if len(self.val_idx) == 0:
            return None, None
        self.module.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, len(self.val_idx), 2 * self.config.batch_size):
            batch = self.val_idx[start : start + 2 * self.config.batch_size]
            logits = self.module(self._inputs(self.images[batch], augment=False))
            y = self.targets[batch].to(self.device)
            total_loss += float(self._loss(logits, y, reduction="sum"))
            correct += self._correct(logits, y)
        return correct / len(self.val_idx), total_loss / len(self.val_idx)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, *, reduction: str) -> torch.Tensor:
        """Cross-entropy; multi-label: binary cross-entropy per class, summed over the classes
        (so that ``"sum"`` and ``"mean"`` are per image, as for cross-entropy)."""
        if not self.config.multilabel:
            return F.cross_entropy(logits, y, reduction=reduction)
        per_image = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").sum(
            dim=1
        )
        return per_image.sum() if reduction == "sum" else per_image.mean()

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """Images predicted right: top-1 = the class; multi-label: the predicted set (sigmoid
        >= 0.5, i.e. logit >= 0) is exactly the true set."""
        if not self.config.multilabel:
            return int((logits.argmax(1) == y).sum())
        return int(((logits >= 0).long() == y).all(dim=1).sum())

    def _inputs(self, images: torch.Tensor, *, augment: bool) -> torch.Tensor:
        images = images.to(self.device)
        x = augment_batch(images, self.augment_rng) if augment else images.float().div_(255.0)
        return (x - self.mean) / self.std

    def _set_mode(self) -> None:
        """Train mode; a frozen backbone stays in eval mode (its batch-norm statistics too)."""
        if not self.config.freeze_backbone:
            self.module.train()
            return
        self.module.eval()
        for name in self.head:
            self.module.get_submodule(name).train()

    def _is_best(self, record: dict[str, Any]) -> bool:
        if record["val_accuracy"] is None:
            return True  # no validation set: the last epoch is the best one known
        if self.best["val_accuracy"] is None:
            return True
        key = (record["val_accuracy"], -record["val_loss"])
        return key > (self.best["val_accuracy"], -self.best["val_loss"])

    def metrics(self) -> dict[str, Any]:
        return {
            "epochs": list(self.history),
            "best_epoch": self.best["epoch"],
            "best_val_accuracy": self.best["val_accuracy"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "training": _resume_view(asdict(self.config)),
            "rng": _rng_states(self.shuffle_rng, self.augment_rng),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [dict(r) for r in state["history"]][: self.epoch]
        self.best = dict(state["best"])
        _set_rng_states(state["rng"], self.shuffle_rng, self.augment_rng)


def _checked(config: TrainConfig) -> TrainConfig:
    checks = [
        (
            config.epochs is None or config.epochs >= 1,
            f"epochs must be at least 1, got {config.epochs}",
        ),
        (config.batch_size >= 1, f"batch size must be at least 1, got {config.batch_size}"),
        (
            config.lr is None or config.lr > 0,
            f"the learning rate must be positive, got {config.lr}",
        ),
        (config.weight_decay >= 0, f"weight decay must be >= 0, got {config.weight_decay}"),
        (0.0 <= config.val_split < 1.0, f"val split must lie in [0, 1), got {config.val_split}"),
        (config.head_channels >= 1, f"head channels must be >= 1, got {config.head_channels}"),
        (
            config.image_size is None or config.image_size >= 8,
            f"image size must be at least 8 pixels, got {config.image_size}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_device(config.device)
    return config


def _with_defaults(config: TrainConfig, network: Network, *, cli: bool = False) -> TrainConfig:
    """Fill in the defaults that depend on the backbone (size, epochs, freezing, lr)."""
    freeze = network.pretrained if config.freeze_backbone is None else config.freeze_backbone
    if freeze and not network.pretrained:
        warnings.warn(
            f"{config.backbone} starts from random weights; freezing it trains only the new "
            f"head on random features (pass {'--finetune' if cli else 'freeze_backbone=False'} "
            "to train the whole network)",
            stacklevel=3,
        )
    lr = config.lr
    if lr is None:
        lr = 3e-4 if network.pretrained and not freeze else 3e-3
    size = config.image_size or network.input_size
    epochs = config.epochs or (SIMPLE_EPOCHS if config.backbone == "simple" else OTHER_EPOCHS)
    filled = {"freeze_backbone": freeze, "lr": lr, "image_size": size, "epochs": epochs}
    return TrainConfig(**{**asdict(config), **filled})


def _open_output(
    output: OutputFolder, settings: dict[str, Any], *, resume: bool, overwrite: bool
) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """Prepare the output folder (the data set and parameters are valid by now), record or
    check the run's settings, and claim the run's files in its manifest. Returns the files'
    paths and the saved training state to resume from (None: start at the first epoch)."""
    resumed = output.prepare(resume=resume, overwrite=overwrite)
    try:
        output.record_settings(TASK, settings)
        files = {name: output.path(name) for name in OUTPUT_FILES}
    except Exception:
        output.discard()
        raise
    state_path = files[STATE_FILE]
    if not (resumed and state_path.is_file()):
        if resume:
            warnings.warn(
                f"nothing to resume in {output.root} (no {STATE_FILE}); starting a new run",
                stacklevel=3,
            )
        return files, None
    try:
        return files, torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file
        raise ConfigError(
            f"cannot read {state_path} ({error}); start again with {output.spell('overwrite')}"
        ) from error


def _run_settings(
    parameters: dict[str, Any],
    classes: list[str],
    loaded: LoadedImages,
    train_idx: list[int],
    val_idx: list[int],
) -> dict[str, Any]:
    """What a resume must match: the parameters that may not change (not ``epochs`` or
    ``device``), the class names and the data set (its folder, its readable images and their
    split, as a digest of the file names)."""
    root = Path(parameters["data"])
    split = {
        "train": [_relative(loaded.paths[i], root) for i in train_idx],
        "val": [_relative(loaded.paths[i], root) for i in val_idx],
    }
    digest = hashlib.sha256(json.dumps(split).encode("utf-8")).hexdigest()[:16]
    return {
        **_resume_view(parameters),
        "classes": list(classes),
        "data": parameters["data"],
        "n_images": parameters["n_images"],
        "images_sha256": digest,
    }


def _check_loaded(loaded: LoadedImages, classes: list[str], root: Path) -> None:
    if loaded.skipped:
        first = "; ".join(reason for _, reason in loaded.skipped[:3])
        more = f" (and {len(loaded.skipped) - 3} more)" if len(loaded.skipped) > 3 else ""
        warnings.warn(
            f"skipped {len(loaded.skipped)} unreadable image(s) in {root}: {first}{more}",
            stacklevel=3,
        )
    counts = (
        loaded.targets.sum(dim=0).tolist()
        if loaded.targets.ndim == 2
        else torch.bincount(loaded.targets, minlength=len(classes)).tolist()
    )
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise ConfigError(
            f"no readable image in class folder(s) {', '.join(repr(e) for e in empty)} of "
            f"{str(root)!r}; replace the broken files or remove the folder(s)"
        )


def _training_parameters(
    config: TrainConfig, root: Path, loaded: LoadedImages, train_idx: list, val_idx: list
) -> dict[str, Any]:
    return {
        **_resume_view(asdict(config)),
        "epochs": config.epochs,
        "data": str(root.resolve()),
        "n_images": len(loaded.paths),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_skipped": len(loaded.skipped),
    }


def _resume_view(parameters: dict[str, Any]) -> dict[str, Any]:
    view = {k: parameters[k] for k in _RESUME_KEYS}
    if parameters.get("multilabel"):  # only then: runs of single-label models resume as before
        view["multilabel"] = True
    return view


def _write_run_files(
    files: dict[str, Path],
    network: Network,
    config: TrainConfig,
    classes: list[str],
    parameters: dict[str, Any],
    loaded: LoadedImages,
    train_idx: list[int],
    val_idx: list[int],
) -> None:
    write_json(
        files[CONFIG_FILE],
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "camlens_version": __version__,
            "architecture": network.architecture,
            "labels": classes,
            "input_size": [config.image_size, config.image_size],
            "mean": list(network.mean),
            "std": list(network.std),
            "multilabel": config.multilabel,
            "training": parameters,
        },
    )
    root = Path(parameters["data"])

    def relative(indices: list[int]) -> list[str]:
        return [_relative(loaded.paths[i], root) for i in indices]

    write_json(
        files[SPLIT_FILE],
        {
            "data": parameters["data"],
            "train": relative(train_idx),
            "val": relative(val_idx),
            "skipped": [{"path": str(p), "reason": r} for p, r in loaded.skipped],
        },
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Copies: safetensors refuses tensors that share memory. One metadata entry only: the
    # header stores several in a hash map, in an order that changes from run to run.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})


def _save_state(state: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _rng_states(shuffle: torch.Generator, augment: torch.Generator) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
        "augment": augment.get_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }


def _set_rng_states(
    states: dict[str, Any], shuffle: torch.Generator, augment: torch.Generator
) -> None:
    torch.set_rng_state(states["torch"])
    shuffle.set_state(states["shuffle"])
    augment.set_state(states["augment"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(int(v) for v in states["python"].tolist()), None))


@contextmanager
def _deterministic(seed: int):
    """Seed torch, numpy and random; use deterministic algorithms; restore the flag after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _scan(data: str | Path, multilabel: bool, *, cli: bool) -> ImageFolder:
    """The data set: an ImageFolder, or the CSV ``image,labels`` of a multi-label run."""
    path = Path(data)
    flag = "--multilabel" if cli else "multilabel=True"
    if multilabel:
        if path.is_dir():
            raise ConfigError(
                f"{flag} trains on a CSV file image,labels (labels separated by "
                f"{LABEL_SEPARATOR!r}), but {str(path)!r} is a folder; pass its CSV, e.g. the "
                "labels.csv of `camlens make-dataset shapes --per-image 2`"
            )
        return scan_label_csv(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        raise ConfigError(
            f"{str(path)!r} is a CSV file; a CSV image,labels is multi-label data: add {flag}, "
            "or pass an ImageFolder (one subfolder of images per class)"
        )
    return scan_image_folder(path)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _replace(module: nn.Module, arch: dict[str, Any]) -> nn.Module:
    return replace_linear(module, arch["classifier"], arch["num_classes"])


def _channels(module: nn.Module, layer: str, example: torch.Tensor) -> int:
    captured: list[int] = []
    handle = module.get_submodule(layer).register_forward_hook(
        lambda _m, _i, output: captured.append(output.shape[1])
    )
    try:
        with torch.no_grad():
            module.eval()(example)
    finally:
        handle.remove()
    return captured[-1]


def _epoch_line(record: dict[str, Any], epochs: int, best: bool) -> str:
    val = record["val_accuracy"]
    val_text = f"val acc {100 * val:.1f} %" if val is not None else "no validation set"
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.3f}, "
        f"train acc {100 * record['train_accuracy']:.1f} %, {val_text}"
        + (" (best)" if best else "")
    )
