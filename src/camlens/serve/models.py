"""The models a server offers: chosen by name from a fixed list, each loaded once."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from camlens.api.explaining import model_task
from camlens.errors import ConfigError
from camlens.models import DEFAULT_MODEL, Classifier, load_model
from camlens.models.checkpoints import is_torchscript
from camlens.models.trained import CONFIG_FILE, WEIGHTS_FILE, read_config

log = logging.getLogger("camlens.serve")


class ModelStore:
    """Models by name, loaded on first use and kept; one lock per model for inference.

    Requests choose among ``names`` only: a request never passes a spec or a path to
    ``load_model``. Methods attach hooks to the model while they run, so two requests must not
    use the same model at once: ``lock(name)`` serialises them (different models may run in
    parallel when the server has several workers).

    Parameters:
        models: specs for ``camlens.load_model`` (default: the built-in model) or
            ``Classifier`` objects (offered under their ``name``).
        models_dir: a folder whose model folders written by ``camlens train`` (they hold
            ``config.json`` and ``model.safetensors``: JSON and tensors, no code) are offered
            under their folder names. Nothing else in it can be served: a lone weights file
            needs its architecture named, a TorchScript model cannot be hooked, and a
            pickled model would run code when loaded. Those entries are listed in
            ``skipped`` with the reason (hidden entries are ignored).

    Example:
        >>> store = ModelStore(["efficientnet_lite0"])
        >>> store.get("efficientnet_lite0").labels[285]
        'Egyptian cat'
    """

    def __init__(
        self,
        models: Sequence[str | Classifier] | None = None,
        models_dir: str | os.PathLike | None = None,
    ) -> None:
        self._specs: dict[str, str | Classifier] = {}
        self.skipped: list[tuple[str, str]] = []
        for model in models or [DEFAULT_MODEL]:
            name = model.name if isinstance(model, Classifier) else str(model).strip()
            self._add(name, model)
        if models_dir is not None:
            entries, self.skipped = _model_entries(Path(models_dir))
            for entry in entries:
                self._add(entry.name, os.fspath(entry))
        self._loaded: dict[str, Classifier] = {}
        self._tasks: dict[str, str] = {}
        self._load_locks = {name: threading.Lock() for name in self._specs}
        self._run_locks = {name: threading.Lock() for name in self._specs}

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    @property
    def default(self) -> str:
        return self.names[0]

    def loaded(self) -> list[str]:
        return [name for name in self._specs if name in self._loaded]

    def check(self, name: str | None) -> str:
        """The model called ``name`` (the default when empty); ConfigError when unknown."""
        name = (name or "").strip() or self.default
        if name not in self._specs:
            raise ConfigError(
                f"unknown model {name!r}; this server offers: {', '.join(self.names)} "
                "(start it with --model or --models-dir to offer others)"
            )
        return name

    def get(self, name: str | None, *, public: bool = False) -> Classifier:
        """The loaded model ``name``; loads it on first use (once, even under concurrency).

        With ``public=True`` (an API request) a model that cannot be loaded raises a
        ConfigError that names the model only: the full reason, which may show the server's
        paths and options, goes to the server's log (logger ``camlens.serve``).
        """
        name = self.check(name)
        with self._load_locks[name]:
            if name not in self._loaded:
                try:
                    self._loaded[name] = load_model(self._specs[name])
                except Exception as error:
                    if not public:
                        raise
                    log.error("cannot load model %r: %s", name, error)
                    raise ConfigError(
                        f"the server cannot load model {name!r} (its log says why); "
                        f"choose another of: {', '.join(self.names)}"
                    ) from None
            return self._loaded[name]

    def task(self, name: str | None) -> str:
        """What model ``name`` does: ``"classification"``, ``"segmentation"`` or
        ``"detection"`` (``camlens.api.explaining.model_task``), found once and kept.

        A model that records no task runs once on a blank input, under ``lock(name)``; a
        model whose output says nothing known is served as a classifier (its own errors then
        come from the classification path)."""
        name = self.check(name)
        if name not in self._tasks:
            classifier = self.get(name, public=True)
            with self.lock(name):
                if name not in self._tasks:
                    try:
                        self._tasks[name] = model_task(classifier)
                    except Exception as error:
                        log.info("model %r: task unknown (%s); served as a classifier", name, error)
                        self._tasks[name] = "classification"
        return self._tasks[name]

    def known_tasks(self) -> dict[str, str]:
        """The tasks found so far (``task``), by model name."""
        return {name: self._tasks[name] for name in self._specs if name in self._tasks}

    def lock(self, name: str | None) -> threading.Lock:
        """Hold this while running a method on model ``name``."""
        return self._run_locks[self.check(name)]

    def _add(self, name: str, spec: str | Classifier) -> None:
        if not name:
            raise ConfigError("a model needs a non-empty name or spec")
        if name in self._specs:
            raise ConfigError(f"two models are called {name!r}; give each model a unique name")
        self._specs[name] = spec


def _model_entries(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The model folders in ``folder``, and (name, reason) for every other entry."""
    shown = repr(os.fspath(folder))
    try:
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise ConfigError(f"--models-dir {shown} {what}")
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"--models-dir {shown} cannot be read: {reason}") from None
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        if name.startswith("."):
            continue
        reason = _not_a_model(folder / name)
        if reason is None:
            found.append(folder / name)
        else:
            skipped.append((name, reason))
    return found, skipped


def _not_a_model(entry: Path) -> str | None:
    """None when ``entry`` is a model folder written by camlens train; else why not."""
    try:
        if entry.is_dir():
            if not (entry / CONFIG_FILE).is_file() or not (entry / WEIGHTS_FILE).is_file():
                return f"not a model folder written by camlens train (no {CONFIG_FILE})"
            read_config(entry)
            return None
        if not entry.is_file():
            return "not a regular file or folder"
        if entry.suffix.lower() == ".safetensors":
            return "weights only: serve it with --model torchvision:<name> --weights FILE"
        if is_torchscript(entry):
            return "a TorchScript model: its compiled code cannot be hooked for maps"
    except ConfigError as error:
        return str(error)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    return (
        "a model file: weights need their architecture named (--model torchvision:<name> "
        "--weights FILE), and a whole pickled model runs code when loaded"
    )
