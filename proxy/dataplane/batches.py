"""Batch input files: the upload is forwarded, and the models its lines name are recorded under
the file id of the upstream's answer before the client has that id, so a batch created right
after, on any replica, is decided on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.config import Upstream
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import UpstreamError, read_answer, send
from proxy.dataplane.headers import copy_response_headers
from proxy.store.batchfiles import BatchFiles

MAX_ANSWER_BYTES = 1 << 20


async def upload_batch_file(
    *,
    method: str,
    pool: UpstreamPool,
    upstream: Upstream,
    url_path: str,
    body: bytes,
    headers: CIMultiDict[str],
    extra_response_headers: Mapping[str, str],
    strip_response_headers: frozenset[str],
    store: BatchFiles,
    models: tuple[str, ...],
    workspace: str,
) -> web.Response:
    """Forward the upload, record its models when the upstream accepted it, then answer.

    Raises ``UpstreamError`` (no answer) and ``BatchFilesUnavailable`` (not recorded).
    """
    upstream_answer = await send(pool, upstream, method, url_path, headers, body)
    answer = await read_answer(upstream_answer, MAX_ANSWER_BYTES)
    status = upstream_answer.status
    if len(answer) > MAX_ANSWER_BYTES:
        raise UpstreamError("upstream_unavailable", "the upload's answer is too large")
    file_id = _file_id(answer) if 200 <= status < 300 else None
    if file_id is not None:
        await store.record(file_id, models, workspace)
    response = web.Response(status=status, reason=upstream_answer.reason or None, body=answer)
    copy_response_headers(upstream_answer.headers, response.headers, strip=strip_response_headers)
    response.headers.pop("content-length", None)
    response.headers.update(extra_response_headers)
    return response


def _file_id(answer: bytes) -> str | None:
    try:
        doc = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    file_id = doc.get("id") if isinstance(doc, dict) else None
    return file_id if isinstance(file_id, str) and file_id else None
