"""The gate in front of the prediction routes: bearer token, JSON bodies of bounded size, and refusals logged in one
line each without the values they held; with the access log's filter that keeps the client's paths out of it."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse, Response

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import DEATH_OR_HOSPICE, PATIENT_ID, REQUEST_ID
from readmission_platform.serving.metrics import REJECTED, UNLOGGED

log = logging.getLogger(__name__)

PROTECTED = ("/predict", "/predict_batch", "/explain", "/model")
POSTED = ("/predict", "/predict_batch", "/explain")
ONE_ENCOUNTER = ("/predict", "/explain")  # their bodies are held to at most `one_encounter` bytes
METHODS = {route: ("POST",) for route in POSTED} | {"/model": ("GET",)}
# Refused requests are logged one line each, at most this many in a burst and then one a second (per worker), so that
# a flood of bad requests cannot grow the log without bound; the rest are counted in readmission_refusals_unlogged.
REFUSAL_LOG_BURST = 60


def _refusal(status: int, message: str) -> JSONResponse:
    # The body may be left unread: closing the connection saves reading the rest of it.
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


class RequestGate:
    """ASGI middleware in front of the prediction routes: the bearer token (none: open), a JSON body of at most
    `max_body` bytes, the count of 4xx answers, and one log line per refused request.

    Also answers /docs.json with the service's contract, made once by `document(token_required)`.
    """

    def __init__(
        self, app: Any, *, token: str | None, max_body: int, one_encounter: int, document: Callable[[bool], dict[str, Any]]
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.limits = {route: min(max_body, one_encounter) for route in ONE_ENCOUNTER}
        self.token = token.encode() if token else None
        self.refusals = RefusalLog(REFUSAL_LOG_BURST)
        self.document = document
        self._document: bytes | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or route not in PROTECTED:
            if route == "/docs.json" and scope["type"] == "http":
                await self._send_document(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        authorization = content_type = content_length = encoding = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"content-encoding":
                encoding = value
        refused = None
        if self.token is not None and not self._authorized(authorization):
            refused = JSONResponse(
                {"error": "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        elif scope["method"] not in (allowed := METHODS[route]):
            # Answered here, as the contract's Error: past BentoML's routes the app mounted at the root would say 404,
            # and FastAPI's own 405 is no such answer.
            refused = JSONResponse({"error": f"{route} takes {allowed[0]}"}, status_code=405, headers={"Allow": ", ".join(allowed)})
        elif route in POSTED:
            limit = self.limits.get(route, self.max_body)
            if content_type is None or content_type.partition(b";")[0].strip().lower() != b"application/json":
                refused = _refusal(415, "the body must be JSON: send the header 'Content-Type: application/json'")
            elif encoding is not None and encoding.strip().lower() != b"identity":
                refused = _refusal(415, "the body must be sent uncompressed: leave out the Content-Encoding header")
            elif content_length is not None and int(content_length) > limit:
                refused = _refusal(413, f"the body is larger than {limit:,} bytes")
            elif content_length is None:  # chunked: counted as it arrives, and the app given it once it is whole
                receive = await self._read_limited(receive, limit)
                if receive is None:
                    refused = _refusal(413, f"the body is larger than {limit:,} bytes")
        if refused is not None:
            REJECTED.labels(route=route, status=str(refused.status_code)).inc()
            self.refusals.write(route, refused.status_code, "")
            await refused(scope, receive, send)
            return

        status = 0
        answer: list[bytes] = []

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if 400 <= status < 500:
                    REJECTED.labels(route=route, status=str(status)).inc()
            elif 400 <= status < 500 and message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.refusals.write(route, status, _offending(b"".join(answer)))
            await send(message)

        await self.app(scope, receive, counting_send)

    def _authorized(self, authorization: bytes | None) -> bool:
        """`Bearer <token>`, the scheme in any case (RFC 7235), the token compared in constant time."""
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(b" "), self.token)

    async def _read_limited(self, receive: Any, limit: int) -> Any:
        """A `receive` replaying the body read so far, or None once it passes `limit` bytes."""
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees it too
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > limit:
                return None
            messages.append(message)
            if not message.get("more_body"):
                break
        replay = iter(messages)

        async def replaying() -> dict:
            return next(replay, None) or await receive()

        return replaying

    async def _send_document(self, scope: dict, receive: Any, send: Any) -> None:
        if self._document is None:
            self._document = json.dumps(self.document(self.token is not None)).encode()
        await Response(self._document, media_type="application/json")(scope, receive, send)


# Names a log line may hold; a key the client made up is a value of theirs and is written as "(unknown)".
_KNOWN_NAMES = frozenset({*schema.RAW_COLUMNS, REQUEST_ID, PATIENT_ID, "encounters"})
_MAX_NAMED = 20


def _offending(answer: bytes) -> str:
    """The fields and error kinds of a refusal's answer (`detail`'s loc and type, or `reason`), values left out."""
    try:
        found = json.loads(answer)
    except ValueError:
        return ""
    if not isinstance(found, dict):
        return ""
    if found.get("reason") == DEATH_OR_HOSPICE:
        return f"discharge_disposition_id ({DEATH_OR_HOSPICE})"
    detail = found.get("detail")
    counts: dict[str, int] = {}
    for error in (e for e in detail if isinstance(e, dict)) if isinstance(detail, list) else ():
        where = ".".join(
            "*" if isinstance(p, int) else p if str(p) in _KNOWN_NAMES else "(unknown)" for p in error.get("loc", ())
        )
        kind = error.get("type")
        key = f"{where or '(body)'} ({kind if isinstance(kind, str) and kind.isidentifier() else '?'})"
        counts[key] = counts.get(key, 0) + 1
    named = [f"{key} x{count:,}" if count > 1 else key for key, count in list(counts.items())[:_MAX_NAMED]]
    more = f", and {len(counts) - _MAX_NAMED:,} more" if len(counts) > _MAX_NAMED else ""
    return ", ".join(named) + more


class RefusalLog:
    """One WARNING line per refused request, through a token bucket: `burst` lines at once, then one a second."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def write(self, route: str, status: int, offending: str) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + now - self.last)
        self.last = now
        if self.tokens < 1:
            UNLOGGED.inc()
            return
        self.tokens -= 1
        log.warning("refused %s %d%s", route, status, f": {offending}" if offending else "")


class RoutesOnly(logging.Filter):
    """Names in BentoML's access log only the paths that are routes: any other path is the client's, and may hold
    an identifier (`/patients/8222157`)."""

    def __init__(self, routes: frozenset[str]) -> None:
        super().__init__()
        self.routes = routes

    def filter(self, record: logging.LogRecord) -> bool:
        # BentoML's format: address, "scheme=…,method=…,path=…[,length=…]", the response, the latency.
        if isinstance(record.args, tuple) and len(record.args) == 4 and isinstance(record.args[1], str):
            request = _ACCESS_REQUEST.fullmatch(record.args[1])
            if request is None or request["path"] not in self.routes:
                head, length = (request["head"], request["length"] or "") if request else ("", "")
                record.args = (record.args[0], f"{head}path=(not a route){length}", *record.args[2:])
        return True


_ACCESS_REQUEST = re.compile(r"(?P<head>.*?,)path=(?P<path>.*?)(?P<length>,length=[0-9]*)?", re.DOTALL)
