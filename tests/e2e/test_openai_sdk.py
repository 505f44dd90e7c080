"""The official ``openai`` SDK as the client of a real proxy process (SPEC §3.1, §3.3, §3.4):
chat completions and responses, plain and streaming, on ``/v1`` and ``/codex/v1``; refusals
raised as the SDK's typed errors with the proxy's ``code``; the filtered model list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from proxy.errors import CODES
from proxy.identity import new_key
from proxy.mock_upstream import DEFAULT_REPLY
from tests.e2e.conftest import ALPHA, NOT_FOUND_MESSAGE, Seeder, Stack, Tenant

SOL, TERRA, LUNA = "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna"
UNLISTED = "gpt-4o-mini"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "say hello to the proxy"}
]


@dataclass(frozen=True)
class World:
    allowed: Tenant  # api: SOL and TERRA; codex: SOL only
    pending: Tenant  # api grant approved by one of two roles
    no_grant: Tenant


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    async def seed() -> World:
        seeder = Seeder(stack.redis_url)
        try:
            allowed = await seeder.tenant()
            subject = f"workspace:{allowed.workspace}"
            await seeder.grant(subject, "gpt-5.6-preview", "api", models=(SOL, TERRA))
            await seeder.grant(subject, "gpt-5.6-preview", "codex", models=(SOL,))
            pending = await seeder.tenant()
            await seeder.grant(f"workspace:{pending.workspace}", approvals=("provider",))
            return World(allowed, pending, await seeder.tenant())
        finally:
            await seeder.close()

    return asyncio.run(seed())


def client(stack: Stack, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.proxy.data_url}{prefix}", api_key=key, max_retries=0, timeout=20.0
    )


@pytest.fixture
def api(stack: Stack, world: World) -> Iterator[openai.OpenAI]:
    with client(stack, world.allowed.key) as c:
        yield c


@pytest.fixture
def codex(stack: Stack, world: World) -> Iterator[openai.OpenAI]:
    with client(stack, world.allowed.key, "/codex/v1") as c:
        yield c


def test_chat_completion(api: openai.OpenAI, codex: openai.OpenAI) -> None:
    for c, model in ((api, SOL), (api, TERRA), (codex, SOL), (api, UNLISTED)):
        raw = c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        assert raw.headers.get("x-request-id")
        completion = raw.parse()
        assert completion.model == model
        assert completion.choices[0].message.content == DEFAULT_REPLY
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 5
        assert completion.usage.completion_tokens == len(DEFAULT_REPLY.split())


def test_chat_completion_stream_with_usage(api: openai.OpenAI, codex: openai.OpenAI) -> None:
    for c in (api, codex):
        stream = c.chat.completions.create(
            model=SOL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == DEFAULT_REPLY
        *body, last = chunks
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.prompt_tokens == 5
        assert last.usage.total_tokens == 5 + len(DEFAULT_REPLY.split())
        assert all(ch.usage is None for ch in body)
        assert [ch.choices[0].finish_reason for ch in body][-1] == "stop"


def test_responses(api: openai.OpenAI, codex: openai.OpenAI) -> None:
    for c in (api, codex):
        response = c.responses.create(model=SOL, input="hello there proxy")
        assert response.output_text == DEFAULT_REPLY
        assert response.status == "completed"
        assert response.usage is not None and response.usage.input_tokens == 3

        events = list(c.responses.create(model=SOL, input="hello there proxy", stream=True))
        kinds = [event.type for event in events]
        assert kinds[0] == "response.created"
        assert kinds[-1] == "response.completed"
        deltas = "".join(
            event.delta for event in events if event.type == "response.output_text.delta"
        )
        assert deltas == DEFAULT_REPLY
        completed = events[-1]
        assert completed.type == "response.completed"
        assert completed.response.usage is not None
        assert completed.response.usage.output_tokens == len(DEFAULT_REPLY.split())


def _assert_refused(exc: openai.APIStatusError, code: str, message: str | None = None) -> None:
    entry = CODES[code]
    assert exc.status_code == entry.status
    assert exc.code == code
    assert isinstance(exc.body, dict)
    assert exc.body["code"] == code
    assert exc.body["type"] == entry.type
    assert exc.body["param"] is None
    if message is not None:
        assert exc.body["message"] == message
    assert exc.response.headers.get("x-request-id")


def test_refusals_raise_typed_errors(stack: Stack, world: World, api: openai.OpenAI) -> None:
    for model in (LUNA, ALPHA):
        with pytest.raises(openai.NotFoundError) as not_found:
            api.chat.completions.create(model=model, messages=MESSAGES)
        _assert_refused(not_found.value, "model_not_found", NOT_FOUND_MESSAGE)
    with pytest.raises(openai.NotFoundError) as not_found:
        api.responses.create(model=LUNA, input="hi", stream=True)
    _assert_refused(not_found.value, "model_not_found", NOT_FOUND_MESSAGE)

    with client(stack, world.allowed.key, "/codex/v1") as codex:
        with pytest.raises(openai.NotFoundError) as not_found:
            codex.chat.completions.create(model=TERRA, messages=MESSAGES)
        _assert_refused(not_found.value, "model_not_found", NOT_FOUND_MESSAGE)

    with client(stack, world.allowed.key, "/chatgpt/v1") as chatgpt:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            chatgpt.chat.completions.create(model=SOL, messages=MESSAGES)
        _assert_refused(denied.value, "product_unavailable")

    with client(stack, world.pending.key) as pending:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            pending.chat.completions.create(model=SOL, messages=MESSAGES, stream=True)
        _assert_refused(denied.value, "access_pending_review")

    with client(stack, world.no_grant.key) as no_grant:
        with pytest.raises(openai.NotFoundError) as not_found:
            no_grant.responses.create(model=SOL, input="hi")
        _assert_refused(not_found.value, "model_not_found", NOT_FOUND_MESSAGE)

    _, unknown = new_key()
    for key in (unknown, "sk-not-ours"):
        with client(stack, key) as stranger:
            with pytest.raises(openai.AuthenticationError) as unauthenticated:
                stranger.chat.completions.create(model=UNLISTED, messages=MESSAGES)
            _assert_refused(unauthenticated.value, "invalid_api_key")
            with pytest.raises(openai.AuthenticationError):
                stranger.models.list()


def test_models_list_is_filtered(
    stack: Stack, world: World, api: openai.OpenAI, codex: openai.OpenAI
) -> None:
    assert {m.id for m in api.models.list()} == {SOL, TERRA, UNLISTED}
    assert {m.id for m in codex.models.list()} == {SOL, UNLISTED}
    with client(stack, world.no_grant.key) as no_grant:
        assert {m.id for m in no_grant.models.list()} == {UNLISTED}
    assert api.models.retrieve(SOL).id == SOL
    with pytest.raises(openai.NotFoundError) as not_found:
        api.models.retrieve(LUNA)
    _assert_refused(not_found.value, "model_not_found", NOT_FOUND_MESSAGE)
