"""The category classifier hook (SPEC §6, §3.4 row 11) through a whole in-process proxy: a real
aiohttp classifier on loopback (answering, slow, failing, or not listening at all), the mock
upstream, and Redis. The classifier is asked only where the tier or the program blocks some
category; when it cannot answer, the declared fail mode decides and is counted."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from prometheus_client import REGISTRY

from proxy import config
from proxy.identity import parse_peppers
from proxy.mock_upstream import MockUpstream
from proxy.policy.standing import Flag
from proxy.server import Proxy
from proxy.snapshot import Holder
from proxy.store.writes import Actor, Writes

PEPPER = "v1:pepper-for-classifier-tests-012345"
ACTOR = Actor("classifier-test", "test")
UNLISTED = "plain-model-1"  # in no program; unlisted_models: allow
GUARDED = "guarded-model-1"  # in a GA program that blocks the bio category itself
TIMEOUT_MS = 200


@dataclass
class Classifier:
    """A classifier on loopback: ``cyber`` when a message says "exploit", ``bio`` for "pathogen".

    ``mode`` is ``answer``, ``slow`` (holds every request until the test ends) or ``broken``
    (500). Every body it was given is kept.
    """

    url: str = ""
    mode: str = "answer"
    bodies: list[Any] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        if self.mode == "slow":
            await self.release.wait()
        if self.mode == "broken":
            return web.json_response({"error": "boom"}, status=500)
        text = json.dumps(self.bodies[-1])
        categories = [c for c, word in (("cyber", "exploit"), ("bio", "pathogen")) if word in text]
        return web.json_response({"categories": categories})


@pytest.fixture
async def classifier() -> AsyncIterator[Classifier]:
    c = Classifier()
    app = web.Application()
    app.router.add_post("/classify", c.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}/classify"
    try:
        yield c
    finally:
        c.release.set()
        await runner.cleanup()


@pytest.fixture
def down_url() -> Iterator[str]:
    """A loopback port that is bound but never listens: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/classify"


def config_text(upstream_url: str, classifier_url: str, fail_mode: str) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
upstreams:
  models: {{url: "{upstream_url}"}}
routes:
  - {{path_prefix: /v1/, product: api, upstream: models}}
programs:
  guarded:
    models: [{GUARDED}]
    phases: {{api: ga}}
    blocked_categories: [bio]
unlisted_models: allow
redis: {{timeout_ms: 2000}}
misuse:
  classifier: {{url: "{classifier_url}", timeout_ms: {TIMEOUT_MS}, fail_mode: {fail_mode}}}
  tiers:
    - {{name: watch, min_score: 1}}
    - {{name: restricted, min_score: 3, rate_limit_factor: 0.5, blocked_categories: [cyber]}}
    - {{name: suspended, min_score: 8}}
"""


@dataclass
class Stack:
    proxy: Proxy
    writes: Writes
    session: aiohttp.ClientSession
    upstream_url: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.data_port}"

    def use(self, classifier_url: str, fail_mode: str) -> None:
        """Swap in a config with this classifier, as a reload would."""
        self.proxy.holder.swap(
            config.parse(config_text(self.upstream_url, classifier_url, fail_mode))
        )

    async def workspace(self, score: int = 0) -> str:
        """A new workspace with flags adding up to ``score``; its API key."""
        org = "org-" + uuid.uuid4().hex[:8]
        ws = "ws-" + uuid.uuid4().hex[:8]
        await self.writes.create_org(ACTOR, org, org)
        await self.writes.create_workspace(ACTOR, ws, org, ws)
        if score:
            cfg = self.proxy.holder.current.config
            flag = Flag(time.time(), "cyber", score, "analyst")
            await self.writes.add_flag(ACTOR, ws, flag, cfg.misuse)
        _, key = await self.writes.issue_key(ACTOR, ws, "k", parse_peppers(PEPPER))
        return key

    async def chat(self, key: str, text: str, model: str = UNLISTED) -> tuple[int, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        async with self.session.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        ) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def stack(redis_url: str, classifier: Classifier) -> AsyncIterator[Stack]:
    upstream = MockUpstream()
    await upstream.start()
    cfg = config.parse(config_text(upstream.url, classifier.url, "closed"))
    proxy = Proxy(Holder(cfg), redis_url, parse_peppers(PEPPER), data_port=0, admin_port=0)
    await proxy.start()
    client = redis.asyncio.Redis.from_url(redis_url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        yield Stack(proxy, Writes(client), session, upstream.url)
    finally:
        await session.close()
        await proxy.stop()
        await client.aclose()
        await upstream.stop()


def failure_mode(mode: str) -> float:
    value = REGISTRY.get_sample_value(
        "access_proxy_failure_mode_total", {"check": "classifier", "mode": mode}
    )
    return value or 0.0


def assert_blocked(status: int, body: Any) -> None:
    assert status == 403, (status, body)
    assert body["error"]["code"] == "category_blocked", body
    assert body["error"]["type"] == "permission_error", body


async def test_restricted_workspace_is_refused_the_blocked_category_only(
    stack: Stack, classifier: Classifier
) -> None:
    key = await stack.workspace(score=3)
    status, body = await stack.chat(key, "write me an exploit for this server")
    assert_blocked(status, body)
    assert classifier.bodies[-1] == {
        "model": UNLISTED,
        "messages": [{"role": "user", "content": "write me an exploit for this server"}],
    }
    status, body = await stack.chat(key, "summarise this poem")
    assert status == 200, body
    # A category the tier does not block passes.
    status, body = await stack.chat(key, "a pathogen in a novel")
    assert status == 200, body
    assert len(classifier.bodies) == 3


async def test_classifier_is_not_asked_where_nothing_is_blocked(
    stack: Stack, classifier: Classifier
) -> None:
    normal = await stack.workspace()
    watched = await stack.workspace(score=1)
    for key in (normal, watched):
        for _ in range(3):
            status, body = await stack.chat(key, "write me an exploit")
            assert status == 200, body
    assert classifier.bodies == []


async def test_a_program_that_blocks_a_category_asks_for_every_workspace(
    stack: Stack, classifier: Classifier
) -> None:
    key = await stack.workspace()
    status, body = await stack.chat(key, "design a pathogen", GUARDED)
    assert_blocked(status, body)
    status, body = await stack.chat(key, "write me an exploit", GUARDED)
    assert status == 200, body  # cyber is blocked by the restricted tier, not by this program
    assert len(classifier.bodies) == 2


@pytest.mark.parametrize("failure", ["slow", "broken", "down"])
async def test_fail_mode_decides_when_the_classifier_cannot_answer(
    stack: Stack, classifier: Classifier, down_url: str, failure: str
) -> None:
    url = down_url if failure == "down" else classifier.url
    classifier.mode = failure if failure != "down" else "answer"
    key = await stack.workspace(score=3)

    stack.use(url, "closed")
    closed_before = failure_mode("closed")
    started = time.monotonic()
    status, body = await stack.chat(key, "summarise this poem")
    assert_blocked(status, body)
    assert time.monotonic() - started < 5.0  # bounded by timeout_ms, not by the classifier
    assert failure_mode("closed") == closed_before + 1

    stack.use(url, "open")
    open_before = failure_mode("open")
    status, body = await stack.chat(key, "summarise this poem")
    assert status == 200, body
    assert failure_mode("open") == open_before + 1
    async with stack.session.get(f"http://127.0.0.1:{stack.proxy.admin_port}/metrics") as resp:
        text = await resp.text()
    assert 'access_proxy_failure_mode_total{check="classifier",mode="open"}' in text
    if failure != "down":
        assert len(classifier.bodies) == 2
