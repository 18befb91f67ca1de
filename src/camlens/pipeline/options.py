"""``RunOptions``: how a batch job runs (not what it computes), the same for every task."""

from __future__ import annotations

from dataclasses import dataclass

from camlens.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS, ENGINES
from camlens.errors import ConfigError, spelling
from camlens.models.devices import check_device


@dataclass(frozen=True)
class RunOptions:
    """How a batch job runs: batch size, device, engine, output-folder policy, progress.

    Attributes:
        batch_size: inputs per batch (per forward pass). Batches are the consecutive slices
            of ``batch_size`` inputs, whatever the engine and however often a run is resumed,
            so the results depend on neither.
        device: torch device for a model given by spec (``"cpu"``, ``"cuda:1"``...).
        engine: ``"local"`` (this process, decoding one batch ahead in threads) or ``"ray"``
            (a pool of Ray actors, each loading the model once; needs ``camlens[ray]``).
        ray_address: address of a running Ray cluster (default: start a local Ray).
        workers: Ray actors (default: one per CPU); only for ``engine="ray"``.
        resume: continue an interrupted run in the output folder (same settings and inputs).
        overwrite: remove what camlens wrote in the output folder before, and start again.
        progress: show a progress bar on stderr.
        max_pixels: the pixel budget: an input with more pixels is an error record (memory
            and decompression-bomb protection); None: only Pillow's own limit.
        cli: errors name command-line options (``--resume``) instead of Python arguments
            (``resume=True``); set by the command line.

    Example:
        >>> RunOptions(batch_size=32, engine="ray", workers=4).engine
        'ray'
        >>> RunOptions(resume=True).spell("overwrite"), RunOptions(cli=True).spell("overwrite")
        ('overwrite=True', '--overwrite')
        >>> RunOptions(engine="spark")
        Traceback (most recent call last):
        camlens.errors.ConfigError: unknown engine 'spark'; choose one of: local, ray
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    cli: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(
                f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}"
            )
        if int(self.batch_size) < 1:
            raise ConfigError(f"{self.spell('batch_size', '')} must be at least 1")
        if self.max_pixels is not None and int(self.max_pixels) < 1:
            raise ConfigError(f"{self.spell('max_pixels', '')} must be at least 1 (or None)")
        if self.workers is not None and int(self.workers) < 1:
            raise ConfigError(f"{self.spell('workers', '')} must be at least 1")
        check_device(self.device)
        if self.resume and self.overwrite:
            raise ConfigError(
                f"{self.spell('resume')} and {self.spell('overwrite')} exclude each other; "
                "choose one"
            )

    def spell(self, name: str, value: object = True) -> str:
        """How the user gives option ``name`` in the interface they use: ``--resume`` on the
        command line, ``resume=True`` in Python (``value=""`` gives the bare name)."""
        return spelling(self.cli)(name, value)
