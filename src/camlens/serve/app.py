"""The web app: an explorer page and a JSON API over ``camlens.explain``.

Routes: ``GET /`` the page, ``POST /api/explain``, ``GET /api/models``, ``GET /api/labels``,
``GET /api/colormaps``, ``GET /healthz``, ``GET /docs`` and ``/openapi.json``.

Safety: only requests addressed to this server's own address are answered, and POSTs only
from its own page (``guard``: DNS rebinding and cross-site forms); request bodies over the
upload limit get 413 without being read whole, and a body must arrive within
``body_timeout`` seconds (408) before the request takes a place in the queue, so slow
clients lock nobody out; uploads stay in memory; images are decoded from memory with a pixel
budget (bad images: 400/415 with a message); requests choose models by name from a fixed
list; model code runs on worker threads behind a bounded queue (503 with Retry-After when it
is full). No input makes the API answer 500: every error is a 4xx with a JSON ``detail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import camlens
from camlens.dense import DEFAULT_SCORE_THRESHOLD
from camlens.errors import ConfigError
from camlens.io import DEFAULT_MAX_PIXELS, ImageLoadError
from camlens.io.samples import SAMPLES
from camlens.methods import METHODS, get_method, methods_for
from camlens.models import Classifier
from camlens.render import colormap_table
from camlens.serve import schemas
from camlens.serve.docs import offline_fastapi
from camlens.serve.guard import HostOriginGuard
from camlens.serve.jobs import (
    DENSE_DEFAULT_METHOD,
    DENSE_TASKS,
    MAX_TOPK,
    PAGE_COLORMAPS,
    PERTURBATION_CHANNELS,
    PERTURBATION_MASKS,
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
    ReadBudget,
    WorkQueue,
    too_large_message,
)
from camlens.serve.models import ModelStore
from camlens.serve.uploads import InMemoryFormRoute, UnsupportedImageError

T = TypeVar("T")

#: Seconds a client has to send a whole request body (``create_app(body_timeout=)``).
BODY_TIMEOUT_S = 30.0

#: Only what the page itself serves: no CDN, no inline script.
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "Bad parameter or unreadable image"},
    403: {"model": schemas.ErrorResponse, "description": "Cross-origin request refused"},
    408: {"model": schemas.ErrorResponse, "description": "Upload not received in time"},
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
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    layer: str | None = None,
    method: str = "cam",
    body_timeout: float = BODY_TIMEOUT_S,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
    **deprecated: Any,
) -> FastAPI:
    """Build the camlens web app (serve it with uvicorn, or ``camlens serve``).

    Parameters:
        models: model specs (default: the built-in ``efficientnet_lite0``) or ``Classifier``
            objects; requests choose among them by name, the first is the default.
        models_dir: a folder whose model folders (written by ``camlens train``) are offered
            too, by folder name; its other entries are skipped (``app.state.store.skipped``
            says why).
        max_upload_mb: largest accepted upload; bigger requests get 413.
        max_queue: requests that may wait for a worker; more get 503 with Retry-After. The
            uploads still arriving share a memory budget of as many uploads as the queue
            holds requests (``threads + max_queue``); beyond it, 503 too.
        threads: threads that run models (requests on the same model take turns).
        max_pixels: largest accepted image, in pixels (decompression-bomb protection).
        max_channels: Score-CAM and Ablation-CAM perturb only this many channels (those with
            the highest mean activation); None: all (minutes per image on a CPU).
        smooth: gradient methods average over this many noisy copies (SmoothGrad); 0: off.
        aug_smooth, eigen_smooth: the methods' options of these names (``CAMMethod``), for
            the methods they apply to.
        layer: the feature layer of every method (default: the model's, found automatically).
        method: the method of requests that name none (and the page's first choice).
        body_timeout: seconds a client has to send its whole request body (408 after);
            a request takes its place in the queue only once its body has arrived.
        allowed_hosts: names (``host`` or ``host:port``) this server answers to besides
            ``localhost``, ``127.0.0.1`` and ``[::1]`` (on the port it listens on); a
            wildcard address (``0.0.0.0``, ``::``) accepts any IP address, ``"*"`` any Host.
            Other Host headers get 400 (DNS rebinding protection, see ``serve.guard``).
        allowed_origins: origins (``http://host:port``) of other pages that may POST to the
            API and read its answers (``"*"``: any page); the server's own page always may.
            Other cross-origin POSTs get 403.
        deprecated: ``workers`` (now ``threads``) and ``perturbation_channels`` (now
            ``max_channels``) still work for one release, with a ``DeprecationWarning``.

    Returns:
        A FastAPI application.

    Raises:
        ConfigError: duplicate model names, a ``models_dir`` that is not a readable folder,
            or a bad limit.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(["efficientnet_lite0"]), base_url="http://localhost")
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
    if not (body_timeout > 0 and math.isfinite(body_timeout)):
        raise ConfigError(f"body_timeout must be a positive number of seconds, got {body_timeout}")
    try:
        guard = {"allowed_hosts": list(allowed_hosts), "allowed_origins": list(allowed_origins)}
        HostOriginGuard(None, **guard)  # checks the names now, not at the first request
    except ValueError as error:
        raise ConfigError(str(error)) from None
    default_method = get_method(method).name
    method_options = {
        "max_channels": max_channels,
        "n_masks": PERTURBATION_MASKS,
        "smooth": smooth,
        "aug_smooth": aug_smooth,
        "eigen_smooth": eigen_smooth,
    }
    store = ModelStore(models, models_dir)
    queue = WorkQueue(workers=threads, max_waiting=max_queue)
    max_upload_bytes = int(max_upload_mb * MEGABYTE)
    max_body_bytes = max_upload_bytes + FORM_OVERHEAD_BYTES

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
    app.router.route_class = InMemoryFormRoute  # form uploads are parsed in memory
    app.add_middleware(  # reads the whole body (in time, within budget), then admits
        Admission,
        queue=queue,
        paths=frozenset({"/api/explain"}),
        body_timeout=body_timeout,
        budget=ReadBudget(queue.capacity * max_body_bytes),
    )
    app.add_middleware(  # a declared oversize body is refused before any of it is read
        BodySizeLimit, max_body_bytes=max_body_bytes, message=too_large_message(max_upload_bytes)
    )
    if allowed_origins:  # other pages allowed to call the API may also read its answers
        origins = list(allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"])
    app.add_middleware(HostOriginGuard, **guard)  # outermost: refuses before anything else
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
        methods = methods_for(store.get(None, public=True).module)
        shown_method = default_method
        task = store.task(None)
        if task in DENSE_TASKS:  # CAM needs a classifier's head
            methods = [name for name in methods if name != "cam"]
            shown_method = DENSE_DEFAULT_METHOD if default_method == "cam" else default_method
        return {
            "models": store.names,
            "default_model": store.default,
            "methods": methods,
            "default_method": shown_method,
            "default_task": task,
            "tasks": store.known_tasks(),
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
        classifier = await anyio.to_thread.run_sync(lambda: store.get(name, public=True))
        return {"model": name, "labels": list(classifier.labels)}

    @app.get("/api/colormaps", summary="The page's colour maps as 256-entry RGB tables")
    def colormaps() -> dict[str, list[list[int]]]:
        return {name: colormap_table(name).tolist() for name in PAGE_COLORMAPS}

    @app.post(
        "/api/explain",
        response_model=schemas.ExplainResponse,
        responses=_ERRORS,
        summary="Explain an image: top-5 predictions and class activation maps (a detector's "
        "or segmenter's: its detections or class regions, each with its map)",
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
        score_threshold: Annotated[
            float,
            Form(
                ge=0.0,
                le=1.0,
                description="Detector: explain the detections scoring at least this.",
            ),
        ] = DEFAULT_SCORE_THRESHOLD,
    ) -> dict[str, Any]:
        if (file is None) == (sample is None):
            raise ConfigError("send exactly one of: an image as 'file', or a 'sample' name")
        method_name = get_method(method or default_method).name
        job = ExplainRequest(
            model=store.check(model),
            method=method_name,
            target=parse_target(target),
            colormap=check_colormap(colormap),
            alpha=alpha,
            sample=check_sample(sample) if sample is not None else None,
            score_threshold=score_threshold,
            method_is_default=method_name == default_method,
        )
        if file is not None:
            data = await file.read(max_upload_bytes + 1)
            await file.close()  # the form's copy goes now: the job holds the upload once
            if len(data) > max_upload_bytes:
                return _error(413, too_large_message(max_upload_bytes))
            job = dataclasses.replace(job, upload=data, filename=file.filename)
        ticket = request.state.ticket  # our place in the queue, taken by Admission
        work = ticket.run(run_request, store, job, max_pixels, method_options, layer)
        return await _unless_client_leaves(request, work)

    return app


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | JSONResponse:
    """The result of ``work``; or, when the client disconnects first (the page cancelled the
    request), ``work`` is cancelled: a job still waiting in the queue leaves it without
    running (a job already running finishes, unseen)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    job.cancel()
    return _error(499, "the client closed the request")  # nobody reads it


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        # A bug, never the client's input: JSON without details (the ASGI server logs the
        # traceback, as Starlette re-raises the error after this answer).
        return _error(500, "the server failed on this request (a bug: its log has the details)")
