"""The models a server offers: chosen by name from a fixed list, each loaded once."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from camlens.errors import ConfigError
from camlens.models import DEFAULT_MODEL, Classifier, load_model


class ModelStore:
    """Models by name, loaded on first use and kept; one lock per model for inference.

    Requests choose among ``names`` only: a request never passes a spec or a path to
    ``load_model``. Methods attach hooks to the model while they run, so two requests must not
    use the same model at once: ``lock(name)`` serialises them (different models may run in
    parallel when the server has several workers).

    Parameters:
        models: specs for ``camlens.load_model`` (default: the built-in model) or
            ``Classifier`` objects (offered under their ``name``).
        models_dir: a folder whose entries (model folders or checkpoint files, hidden ones
            skipped) are offered under their file names.

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
        for model in models or [DEFAULT_MODEL]:
            name = model.name if isinstance(model, Classifier) else str(model).strip()
            self._add(name, model)
        if models_dir is not None:
            for entry in _model_entries(Path(models_dir)):
                self._add(entry.name, os.fspath(entry))
        self._loaded: dict[str, Classifier] = {}
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

    def get(self, name: str | None) -> Classifier:
        """The loaded model ``name``; loads it on first use (once, even under concurrency)."""
        name = self.check(name)
        with self._load_locks[name]:
            if name not in self._loaded:
                self._loaded[name] = load_model(self._specs[name])
            return self._loaded[name]

    def lock(self, name: str | None) -> threading.Lock:
        """Hold this while running a method on model ``name``."""
        return self._run_locks[self.check(name)]

    def _add(self, name: str, spec: str | Classifier) -> None:
        if not name:
            raise ConfigError("a model needs a non-empty name or spec")
        if name in self._specs:
            raise ConfigError(f"two models are called {name!r}; give each model a unique name")
        self._specs[name] = spec


def _model_entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"--models-dir {os.fspath(folder)!r} is not a folder")
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
