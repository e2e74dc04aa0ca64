"""Refuses a request body over the limit with a 413 problem detail before it is read into
memory: by its Content-Length, or, for a chunked body, once the bytes seen pass it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keeper_api.problems import ProblemError, problem_response


class BodyTooLargeError(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> ProblemError:
        return ProblemError(
            f"the request body is larger than {self.max_bytes} bytes",
            status=413,
            reason="body-too-large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await problem_response(self._refusal())(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await problem_response(self._refusal())(scope, receive, send)
