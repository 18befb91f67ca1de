"""The web app: an explorer page and a JSON API over ``camlens.explain``.

Routes: ``GET /`` the page, ``POST /api/explain``, ``GET /api/models``, ``GET /api/labels``,
``GET /api/colormaps``, ``GET /healthz``, ``GET /docs`` and ``/openapi.json``.

Safety: request bodies over the upload limit get 413 without being read whole; images are
decoded from memory with decompression-bomb protection (bad images: 400/415 with a message);
requests choose models by name from a fixed list; model code runs on worker threads behind a
bounded queue (503 with Retry-After when it is full).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import camlens
from camlens.errors import ConfigError
from camlens.io import DEFAULT_MAX_PIXELS, ImageLoadError
from camlens.io.samples import SAMPLES
from camlens.methods import METHODS, get_method
from camlens.models import Classifier
from camlens.render import colormap_table
from camlens.serve import schemas
from camlens.serve.docs import offline_fastapi
from camlens.serve.jobs import (
    MAX_TOPK,
    PAGE_COLORMAPS,
    PERTURBATION_CHANNELS,
    ExplainRequest,
    check_colormap,
    check_sample,
    parse_target,
    run_request,
)
from camlens.serve.limits import (
    FORM_OVERHEAD_BYTES,
    MEGABYTE,
    Admission,
    BodySizeLimit,
    WorkQueue,
    too_large_message,
)
from camlens.serve.models import ModelStore
from camlens.serve.uploads import UnsupportedImageError

#: Only what the page itself serves: no CDN, no inline script.
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "Bad parameter or unreadable image"},
    413: {"model": schemas.ErrorResponse, "description": "Upload over the size limit"},
    415: {"model": schemas.ErrorResponse, "description": "Not an image format"},
    503: {"model": schemas.ErrorResponse, "description": "Busy: retry after Retry-After s"},
}


def create_app(
    models: Sequence[str | Classifier] | None = None,
    models_dir: str | os.PathLike | None = None,
    max_upload_mb: float = 20,
    max_queue: int = 8,
    threads: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_channels: int | None = PERTURBATION_CHANNELS,
    smooth: int = 0,
    layer: str | None = None,
    method: str = "cam",
    **deprecated: Any,
) -> FastAPI:
    """Build the camlens web app (serve it with uvicorn, or ``camlens serve``).

    Parameters:
        models: model specs (default: the built-in ``efficientnet_lite0``) or ``Classifier``
            objects; requests choose among them by name, the first is the default.
        models_dir: a folder whose entries are offered as models too (by file name).
        max_upload_mb: largest accepted upload; bigger requests get 413.
        max_queue: requests that may wait for a worker; more get 503 with Retry-After.
        threads: threads that run models (requests on the same model take turns).
        max_pixels: largest accepted image, in pixels (decompression-bomb protection).
        max_channels: Score-CAM and Ablation-CAM perturb only this many channels (those with
            the highest mean activation); None: all (minutes per image on a CPU).
        smooth: gradient methods average over this many noisy copies (SmoothGrad); 0: off.
        layer: the feature layer of every method (default: the model's, found automatically).
        method: the method of requests that name none (and the page's first choice).
        deprecated: ``workers`` (now ``threads``) and ``perturbation_channels`` (now
            ``max_channels``) still work for one release, with a ``DeprecationWarning``.

    Returns:
        A FastAPI application.

    Raises:
        ConfigError: duplicate model names or a ``models_dir`` that is not a folder.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(["efficientnet_lite0"]))
        >>> with open("cat.jpg", "rb") as photo:
        ...     response = client.post("/api/explain", files={"file": photo},
        ...                            data={"target": "top1"})
        >>> prediction = response.json()["predictions"][0]
        >>> prediction["class"], prediction["label"]
        (285, 'Egyptian cat')
        >>> client.get("/healthz").json()["models_loaded"]
        ['efficientnet_lite0']
        >>> import uvicorn  # serve it on 127.0.0.1:8000, until interrupted:
        >>> uvicorn.run(create_app(), port=8000)  # doctest: +SKIP
    """
    renamed = {"workers": "threads", "perturbation_channels": "max_channels"}
    for old in deprecated:
        if old not in renamed:
            raise TypeError(f"create_app() got an unexpected keyword argument {old!r}")
        warnings.warn(
            f"create_app({old}=...) is deprecated; use {renamed[old]}=", DeprecationWarning, 2
        )
    threads = deprecated.get("workers", threads)
    max_channels = deprecated.get("perturbation_channels", max_channels)
    if max_upload_mb <= 0:
        raise ConfigError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if max_channels is not None and max_channels < 1:
        raise ConfigError(f"max_channels must be >= 1 or None, got {max_channels}")
    if smooth < 0:
        raise ConfigError(f"smooth must be >= 0, got {smooth}")
    default_method = get_method(method).name
    method_options = {"max_channels": max_channels, "smooth": smooth}
    store = ModelStore(models, models_dir)
    queue = WorkQueue(workers=threads, max_waiting=max_queue)
    max_upload_bytes = int(max_upload_mb * MEGABYTE)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        queue.shutdown()

    app = offline_fastapi(
        title="camlens",
        version=camlens.__version__,
        description="Where does a convolutional network look? Class activation maps (CAM, "
        "Grad-CAM and family) for an uploaded image.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.queue = queue
    app.add_middleware(Admission, queue=queue, paths=frozenset({"/api/explain"}))
    app.add_middleware(  # outermost: a declared oversize body is refused before admission
        BodySizeLimit,
        max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES,
        message=too_large_message(max_upload_bytes),
    )
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(packages=[("camlens.serve", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = resources.files("camlens.serve").joinpath("static", "index.html")
        return FileResponse(str(index), headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/healthz", response_model=schemas.Health, summary="Liveness and queue state")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "models_loaded": store.loaded(), "queue": queue.stats()}

    @app.get("/api/models", response_model=schemas.ModelsResponse, summary="What can be chosen")
    def list_models() -> dict[str, Any]:
        return {
            "models": store.names,
            "default_model": store.default,
            "methods": list(METHODS),
            "default_method": default_method,
            "colormaps": list(PAGE_COLORMAPS),
            "samples": list(SAMPLES),
            "max_upload_mb": max_upload_mb,
            "max_topk": MAX_TOPK,
        }

    @app.get(
        "/api/labels",
        response_model=schemas.LabelsResponse,
        responses={400: _ERRORS[400]},
        summary="Class names of a model, in class-index order",
    )
    async def labels(
        model: Annotated[str | None, Query(description="Model name (default: the first).")] = None,
    ) -> dict[str, Any]:
        name = store.check(model)
        classifier = await anyio.to_thread.run_sync(store.get, name)
        return {"model": name, "labels": list(classifier.labels)}

    @app.get("/api/colormaps", summary="The page's colour maps as 256-entry RGB tables")
    def colormaps() -> dict[str, list[list[int]]]:
        return {name: colormap_table(name).tolist() for name in PAGE_COLORMAPS}

    @app.post(
        "/api/explain",
        response_model=schemas.ExplainResponse,
        responses=_ERRORS,
        summary="Explain an image: top-5 predictions and class activation maps",
    )
    async def explain_image(
        request: Request,
        file: Annotated[
            UploadFile | None, File(description="The image (JPEG, PNG, WebP...).")
        ] = None,
        sample: Annotated[
            str | None, Form(description=f"Instead of a file, a bundled photo: {list(SAMPLES)}.")
        ] = None,
        model: Annotated[str | None, Form(description="Model name (GET /api/models).")] = None,
        method: Annotated[
            str | None, Form(description=f"One of {list(METHODS)} (default: the server's).")
        ] = None,
        target: Annotated[
            str,
            Form(description=f"top1 .. top{MAX_TOPK}, a class id or a class name."),
        ] = "top1",
        colormap: Annotated[str, Form(description="Matplotlib colour map.")] = "jet",
        alpha: Annotated[float, Form(ge=0.0, le=1.0, description="Heat-map opacity.")] = 0.5,
    ) -> dict[str, Any]:
        if (file is None) == (sample is None):
            raise ConfigError("send exactly one of: an image as 'file', or a 'sample' name")
        job = ExplainRequest(
            model=store.check(model),
            method=get_method(method or default_method).name,
            target=parse_target(target),
            colormap=check_colormap(colormap),
            alpha=alpha,
            sample=check_sample(sample) if sample is not None else None,
        )
        if file is not None:
            data = await file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                return _error(413, too_large_message(max_upload_bytes))
            job = dataclasses.replace(job, upload=data, filename=file.filename)
        ticket = request.state.ticket  # our place in the queue, taken by Admission
        return await ticket.run(run_request, store, job, max_pixels, method_options, layer)

    return app


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConfigError)
    async def config_error(_: Request, error: ConfigError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(UnsupportedImageError)
    async def unsupported_image(_: Request, error: UnsupportedImageError) -> JSONResponse:
        return _error(415, error.message)

    @app.exception_handler(ImageLoadError)
    async def bad_image(_: Request, error: ImageLoadError) -> JSONResponse:
        return _error(400, error.message)
