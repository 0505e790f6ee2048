"""A cap on the bodies of every request but uploads: FastAPI reads a JSON body whole into memory before
validating it, so without a cap one request could hold the API's memory hostage. `/from-file` streams
its multipart body under its own caps (api/upload.py)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from pipelines.errors import TooLarge

MAX_JSON_BYTES = 1 << 20  # the largest real body (an archive of 200 stem ids) is about 8 KiB
STREAMED = ("/from-file",)


class BodyLimit:
    def __init__(self, app, max_bytes: int = MAX_JSON_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in STREAMED:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body without Content-Length: found while reading
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send) -> None:
        error = TooLarge(f"request body over {self.max_bytes} bytes", max_bytes=self.max_bytes)
        body = json.dumps({"detail": error.message, **error.to_dict()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.http_status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
