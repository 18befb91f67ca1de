"""Record streams: the local engine and the Ray engine (its actor and its job)."""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from camlens.evaluation.measure import WorkItem, _BatchEvaluator, make_methods
from camlens.evaluation.registry import _Settings
from camlens.methods import CAMMethod
from camlens.models import Classifier, load_model
from camlens.runner import chunks, prefetched

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class _ActorJob:
    """What each Ray actor needs to build its ``_BatchEvaluator``: a model spec it loads itself
    or the ``Classifier``, and method names or instances (pickled together with the
    ``Classifier``, so that they share its module)."""

    model: Classifier | str
    methods: tuple[str | CAMMethod, ...]
    layer: str | None
    settings: _Settings


def _actor_job(
    model: Classifier | nn.Module | str,
    classifier: Classifier,
    requested: Sequence[str | CAMMethod] | str,
    instances: list[CAMMethod],
    layer: str | None,
    settings: _Settings,
) -> _ActorJob:
    given_instances = not isinstance(requested, str) and any(
        isinstance(m, CAMMethod) for m in requested
    )
    if given_instances:
        return _ActorJob(classifier, tuple(instances), layer, settings)
    from camlens.ray_engine import model_for_actors

    spec = model if isinstance(model, str) else model_for_actors(classifier)
    return _ActorJob(spec, tuple(m.name for m in instances), layer, settings)


class _RayEvaluator:
    """Ray actor: one ``_BatchEvaluator``; rows of pickled batches in, JSON records out."""

    def __init__(self, job: _ActorJob) -> None:
        torch.set_num_threads(1)
        classifier = load_model(job.model) if isinstance(job.model, str) else job.model
        methods = make_methods(classifier, list(job.methods), job.layer)
        self.evaluator = _BatchEvaluator(classifier, methods, job.settings)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [
            json.dumps(record)
            for payload in rows["batch"]
            for record in self.evaluator.records(pickle.loads(payload))
        ]
        return {"record": np.array(records, dtype=object)}


def _records(
    classifier: Classifier,
    instances: list[CAMMethod],
    work: list[WorkItem],
    done: set[int],
    job: _ActorJob,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """The records of the images not ``done``, in input order.

    Batches are the consecutive slices of ``batch_size`` annotated images, always the same
    ones: a batch that is partly done is computed whole (the records already there are not
    written again), so that every image is measured in the same company as in an
    uninterrupted run (ROAD's noise depends on an image's position in its batch). The local
    engine decodes the next batch in threads while the current one is measured
    (``runner.prefetched``).
    """
    batches = [
        b for b in chunks(work, job.settings.batch_size) if any(i not in done for i, *_ in b)
    ]
    todo = sum(1 for b in batches for i, *_ in b if i not in done)
    if engine == "ray" and batches:
        from camlens.ray_engine import ordered_map_batches

        # Pickled: annotations carry paths, tuples and lazy mask readers, not table columns.
        rows = [{"batch": pickle.dumps(batch)} for batch in batches]
        outputs = ordered_map_batches(
            rows, _RayEvaluator, {"job": job}, 1, address=ray_address, workers=workers
        )
        computed = (json.loads(r) for output in outputs for r in output["record"])
    else:
        evaluator = _BatchEvaluator(classifier, instances, job.settings)
        computed = (
            record
            for batch, images in prefetched(batches, evaluator.load)
            for record in evaluator.measure(batch, images)
        )
    bar = tqdm(total=todo, desc="images", unit="img", file=sys.stderr, disable=not progress)
    with bar:
        for record in computed:
            if record["index"] not in done:
                bar.update(1)
                yield record
