"""JSON answers, encoded one way for every route that builds its own body.

orjson rather than FastAPI's `JSONResponse`: it is several times faster on the nested lists a
prediction carries, and these routes build their answers themselves, so there is no response model
to validate them against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """`content` as a JSON answer with `status` and any extra `headers`.

    >>> json_response({"live": True}).body
    b'{"live":true}'
    """
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)
