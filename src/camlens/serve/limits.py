"""What keeps the server's memory bounded: a request-body limit and a bounded work queue."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")

MEGABYTE = 1024 * 1024

#: Room for the multipart boundaries and the small form fields next to the file.
FORM_OVERHEAD_BYTES = 64 * 1024


def too_large_message(max_upload_bytes: int) -> str:
    return (
        f"the upload is larger than this server's limit of {max_upload_bytes / MEGABYTE:g} MB; "
        "send a smaller image, or start the server with a larger --max-upload-mb"
    )


class BodyTooLargeError(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BodySizeLimit:
    """ASGI middleware: answer 413 to request bodies over ``max_body_bytes``.

    A declared ``Content-Length`` over the limit is refused before any of the body is read;
    a body without one (chunked) is counted while it streams in and refused as soon as it
    passes the limit, so a large upload is never held whole in memory.

    Example:
        >>> app.add_middleware(BodySizeLimit, max_body_bytes=20 * MEGABYTE, message="too big")
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, message: str) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Inside a route FastAPI turns this HTTPException into the 413 response.
                    raise BodyTooLargeError(self.message)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLargeError:
            if started:
                raise
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class QueueFullError(Exception):
    """Every place in the queue is taken; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class WorkQueue:
    """Run blocking jobs on ``workers`` threads, with at most ``capacity`` requests admitted.

    A request is admitted (``admit``) before its upload is read and keeps its place until its
    job has finished on a worker thread, even when its client has gone away; so at most
    ``workers + max_waiting`` uploads and jobs are in memory at once. The event loop never
    runs model code, so the server keeps answering (health checks, pages, 503s) meanwhile.

    Example:
        >>> queue = WorkQueue(workers=1, max_waiting=8)
        >>> result = await queue.run(explain_one, request)   # raises QueueFullError when full
    """

    def __init__(self, workers: int = 1, max_waiting: int = 8) -> None:
        if workers < 1 or max_waiting < 0:
            raise ValueError(
                f"need workers >= 1 and max_waiting >= 0, got {workers} and {max_waiting}"
            )
        self.workers = workers
        self.capacity = workers + max_waiting
        self.active = 0
        self.finished = 0
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="camlens-serve")
        self._seconds_per_job: float | None = None
        self._timing_lock = threading.Lock()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: mean job time x jobs per worker ahead."""
        per_job = self._seconds_per_job or 1.0
        return max(1, math.ceil(per_job * math.ceil(self.active / self.workers)))

    def admit(self) -> Ticket:
        """A place in the queue (call on the event loop); QueueFullError when there is none."""
        if self.active >= self.capacity:
            raise QueueFullError(self.retry_after())
        self.active += 1
        return Ticket(self)

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Admit, run ``job(*args)`` on a worker thread and return its result (or raise)."""
        ticket = self.admit()
        try:
            return await ticket.run(job, *args)
        finally:
            ticket.close()

    def stats(self) -> dict[str, int]:
        return {"active": self.active, "capacity": self.capacity, "finished": self.finished}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self, finished: bool) -> None:
        self.active -= 1
        self.finished += finished

    def _timed(self, job: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return job(*args)
        finally:
            seconds = time.perf_counter() - start
            with self._timing_lock:
                last = self._seconds_per_job
                self._seconds_per_job = seconds if last is None else 0.8 * last + 0.2 * seconds


class Ticket:
    """One admitted request's place in a ``WorkQueue``: run one job with it, or close it."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue
        self._state = "admitted"

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Run ``job(*args)`` on a worker thread; the place is freed when the job ends."""
        if self._state != "admitted":
            raise RuntimeError(f"this ticket is {self._state}; a ticket runs one job")
        self._state = "submitted"
        loop = asyncio.get_running_loop()
        future = self._queue._executor.submit(self._queue._timed, job, *args)

        def release(_: Future) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._queue._release, True)

        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Free the place if no job was submitted (a rejected or failed request)."""
        if self._state == "admitted":
            self._state = "closed"
            self._queue._release(False)


class Admission:
    """ASGI middleware: admit POST requests to ``paths`` into ``queue`` before reading them.

    An admitted request finds its ``Ticket`` in ``request.state.ticket``. When the queue is
    full the request gets 503 with ``Retry-After``; its body is read and dropped chunk by
    chunk first (never kept), so that the client receives the answer rather than a reset
    connection.
    """

    def __init__(self, app: ASGIApp, queue: WorkQueue, paths: frozenset[str]) -> None:
        self.app = app
        self.queue = queue
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            ticket = self.queue.admit()
        except QueueFullError as error:
            await _discard_body(receive)
            headers = {"Retry-After": str(error.retry_after)}
            await JSONResponse({"detail": str(error)}, 503, headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["ticket"] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.close()


async def _discard_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
