"""What keeps the server's memory and time bounded: request bodies read first, within a size
limit, a time limit and a memory budget, then a bounded work queue."""

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
        >>> from fastapi import FastAPI, Request
        >>> from fastapi.testclient import TestClient
        >>> app = FastAPI()
        >>> @app.post("/echo")
        ... async def echo(request: Request):
        ...     return {"bytes": len(await request.body())}
        >>> app.add_middleware(BodySizeLimit, max_body_bytes=1024, message="too big")
        >>> client = TestClient(app)
        >>> client.post("/echo", content=b"x" * 100).json()
        {'bytes': 100}
        >>> response = client.post("/echo", content=b"x" * 2000)
        >>> response.status_code, response.json()
        (413, {'detail': 'too big'})
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

    A request is admitted (``admit``) once its upload has been received (see ``Admission``)
    and keeps its place until its job has finished on a worker thread, even when its client
    has gone away; so at most ``workers + max_waiting`` admitted uploads and jobs are in
    memory at once. The event loop never
    runs model code, so the server keeps answering (health checks, pages, 503s) meanwhile.

    Example:
        >>> queue = WorkQueue(workers=1, max_waiting=8)
        >>> asyncio.run(queue.run(sum, [1, 2, 3]))  # in a request handler: await queue.run(...)
        6
        >>> queue.stats()
        {'active': 0, 'capacity': 9, 'finished': 1}
        >>> queue.shutdown()
        >>> full = WorkQueue(workers=1, max_waiting=0)
        >>> ticket = full.admit()  # the one place, taken
        >>> full.admit()
        Traceback (most recent call last):
        camlens.serve.limits.QueueFullError: the server is busy; retry in 1 s
        >>> full.shutdown()
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

        def release(done: Future) -> None:
            finished = not done.cancelled()  # cancelled: its client left before it started
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._queue._release, finished)

        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Free the place if no job was submitted (a rejected or failed request)."""
        if self._state == "admitted":
            self._state = "closed"
            self._queue._release(False)


class BodyTimeoutError(Exception):
    """The client did not send its whole request body within the time limit."""


class ReadBudget:
    """Bytes of request bodies being received (not yet admitted), all requests together.

    Each request body is read whole before the request takes a place in the ``WorkQueue``;
    this budget bounds the memory those bodies hold meanwhile. A client holds only the bytes
    it has actually sent, so slow clients take almost none of it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, count: int) -> bool:
        """Reserve ``count`` more bytes (call on the event loop); False when they do not fit."""
        if self.held + count > self.max_bytes:
            return False
        self.held += count
        return True

    def give_back(self, count: int) -> None:
        self.held -= count


class Admission:
    """ASGI middleware: read the body of POST requests to ``paths``, then admit them to ``queue``.

    The whole body is received first, within ``body_timeout`` seconds in all and (counted
    by ``budget``) in memory, never on disk; only then does the request take a place in the
    queue. So clients that send slowly hold no place: they cannot lock the others out, and
    they are cut off with 408 when their time is up. An admitted request finds its ``Ticket``
    in ``request.state.ticket`` and its body replayed from memory. When the queue is full,
    or the bodies being received already fill ``budget``, the request gets 503 with
    ``Retry-After`` (its body is read to the end and dropped first, so that the client
    receives the answer rather than a reset connection).

    Example:
        >>> from fastapi import FastAPI, Request
        >>> from fastapi.testclient import TestClient
        >>> app = FastAPI()
        >>> @app.post("/work")
        ... async def work(request: Request):
        ...     body = await request.body()
        ...     return await request.state.ticket.run(len, body)
        >>> queue = WorkQueue(workers=1, max_waiting=0)
        >>> app.add_middleware(Admission, queue=queue, paths=frozenset({"/work"}),
        ...                    body_timeout=10.0, budget=ReadBudget(1024))
        >>> TestClient(app).post("/work", content=b"x" * 100).json()
        100
        >>> response = TestClient(app).post("/work", content=b"x" * 2000)  # over the budget
        >>> response.status_code, response.json()["detail"]
        (503, 'the server is busy; retry in 1 s')
        >>> queue.shutdown()
    """

    def __init__(
        self,
        app: ASGIApp,
        queue: WorkQueue,
        paths: frozenset[str],
        body_timeout: float,
        budget: ReadBudget,
    ) -> None:
        self.app = app
        self.queue = queue
        self.paths = paths
        self.body_timeout = body_timeout
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        chunks: list[bytes] = []
        held = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    body = message.get("body", b"")
                    if not self.budget.take(len(body)):
                        chunks.clear()
                        self.budget.give_back(held)  # now: the rest is read and dropped
                        held = 0
                        await _discard_body(receive, message)
                        await self._busy(scope, receive, send)
                        return
                    held += len(body)
                    if body:
                        chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = (
                f"the request body did not arrive within {self.body_timeout:g} s; "
                "send it again (on a slow connection: a smaller image)"
            )
            headers = {"Connection": "close"}
            await JSONResponse({"detail": detail}, 408, headers)(scope, receive, send)
            return
        finally:
            self.budget.give_back(held)
        try:
            ticket = self.queue.admit()
        except QueueFullError:
            await self._busy(scope, receive, send)
            return
        scope.setdefault("state", {})["ticket"] = ticket
        try:
            await self.app(scope, _Replay(chunks, receive), send)
        finally:
            ticket.close()

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = QueueFullError(self.queue.retry_after())
        headers = {"Retry-After": str(error.retry_after)}
        await JSONResponse({"detail": str(error)}, 503, headers)(scope, receive, send)


class _Replay:
    """A ``receive`` that hands out the body read before (each chunk dropped once handed,
    the last one ending the body), then waits on the client's own ``receive`` (for its
    disconnect)."""

    def __init__(self, chunks: list[bytes], receive: Receive) -> None:
        chunks.reverse()  # in place: a chunk handed out is no longer held anywhere here
        self._chunks = chunks
        self._receive = receive
        self._ended = False

    async def __call__(self) -> Message:
        if self._ended:
            return await self._receive()
        body = self._chunks.pop() if self._chunks else b""
        self._ended = not self._chunks
        return {"type": "http.request", "body": body, "more_body": not self._ended}


async def _discard_body(receive: Receive, message: Message) -> None:
    while message["type"] == "http.request" and message.get("more_body", False):
        message = await receive()
