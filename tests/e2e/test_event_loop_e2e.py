"""``serve`` on either event loop (``proxy.eventloop``): uvloop by default when installed,
asyncio's own loop with ``ACCESS_PROXY_LOOP=asyncio``. On each, a rate-limited request (the
limiter's own RESP connection), a stream and a refusal behave the same."""

from __future__ import annotations

import importlib.util

import aiohttp
import pytest

from tests.e2e.conftest import (
    PREVIEW,
    Seeder,
    Stack,
    assert_allowed,
    assert_error,
    chat_body,
    request,
)

LOOPS = ["asyncio"]
if importlib.util.find_spec("uvloop") is not None:
    LOOPS.append("uvloop")


@pytest.mark.parametrize("loop", LOOPS)
async def test_serve_enforces_and_streams_the_same_on_each_loop(
    loop: str,
    stack: Stack,
    seed: Seeder,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCESS_PROXY_LOOP", loop)
    serve = stack.start_serve(f"loop-{loop}")
    try:
        async with http.get(serve.admin_url + "/readyz") as resp:
            assert (await resp.json())["event_loop"] == loop
        allowed = await seed.tenant()
        await seed.grant(f"workspace:{allowed.workspace}", PREVIEW, "api")
        answer = await request(http, serve.data_url, key=allowed.key, model="gpt-5.6-sol")
        assert_allowed(answer)
        assert "x-ratelimit-remaining-requests" in answer.headers, answer.headers
        stranger = await seed.tenant()
        refused = await request(http, serve.data_url, key=stranger.key, model="gpt-5.6-sol")
        assert_error(refused, "model_not_found")
        async with http.post(
            serve.data_url + "/v1/chat/completions",
            json=chat_body("gpt-5.6-sol", stream=True),
            headers={"Authorization": f"Bearer {allowed.key}"},
        ) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    finally:
        assert serve.stop() == 0, serve.log()
