"""Usage extraction from JSON bodies and SSE tails, and pricing with default and explicit cache
rates (SPEC §10)."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest

from proxy import config
from proxy.config import Price, Pricing
from proxy.metering import Usage, extract_usage, price
from proxy.mock_upstream import ReportedUsage as MockUsage


def sse(*events: Any, done: bool = True) -> bytes:
    out = b""
    for event in events:
        if isinstance(event, tuple):
            name, data = event
            out += f"event: {name}\n".encode()
        else:
            data = event
        out += b"data: " + json.dumps(data).encode() + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return out


MOCK = MockUsage(
    prompt_tokens=1000, cached_tokens=400, cache_write_tokens=100, completion_tokens=200
)
EXPECTED = Usage(input=500, cached_input=400, cache_write=100, output=200)


def test_chat_completion_json() -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": MOCK.chat()}
    got = extract_usage(json.dumps(body).encode(), is_stream=False)
    assert got == EXPECTED
    assert got is not None and got.prompt == 1000


def test_responses_api_json() -> None:
    body = {"id": "resp_1", "object": "response", "output": [], "usage": MOCK.responses()}
    assert extract_usage(json.dumps(body).encode(), is_stream=False) == EXPECTED


def test_chat_without_cache_details_is_all_uncached_input() -> None:
    body = {"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    assert extract_usage(json.dumps(body).encode(), False) == Usage(7, 0, 0, 3)


def test_sse_chat_with_include_usage_reads_the_last_chunk() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-5.6-sol"}
    stream = sse(
        {**head, "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {**head, "choices": [], "usage": MOCK.chat()},
    )
    assert extract_usage(stream, is_stream=True) == EXPECTED
    # CRLF framing and "data:" without a space are read alike.
    crlf = stream.replace(b"\n", b"\r\n").replace(b"data: ", b"data:")
    assert extract_usage(crlf, is_stream=True) == EXPECTED


def test_sse_chat_without_include_usage_has_none() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk"}
    stream = sse(
        {**head, "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )
    assert extract_usage(stream, is_stream=True) is None


def test_sse_responses_completed_event() -> None:
    def response(with_usage: bool) -> dict[str, Any]:
        return {"id": "resp_1", "status": "x", "usage": MOCK.responses() if with_usage else None}

    stream = sse(
        ("response.created", {"type": "response.created", "response": response(False)}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.completed", {"type": "response.completed", "response": response(True)}),
        done=False,
    )
    assert extract_usage(stream, is_stream=True) == EXPECTED


def test_anthropic_names_count_cache_tokens_beside_input() -> None:
    body = {
        "type": "message",
        "usage": {
            "input_tokens": 500,
            "cache_read_input_tokens": 400,
            "cache_creation_input_tokens": 100,
            "output_tokens": 200,
        },
    }
    assert extract_usage(json.dumps(body).encode(), False) == EXPECTED


def test_large_json_body_is_probed_from_the_end() -> None:
    # The reply text mentions "usage" (escaped inside a string) before the real object.
    text = 'the "usage": {"prompt_tokens": 99} in text ' + "x" * 200_000
    body = {"choices": [{"message": {"content": text}}], "usage": MOCK.chat()}
    raw = json.dumps(body).encode()
    assert len(raw) > 64 * 1024
    assert extract_usage(raw, is_stream=False) == EXPECTED
    no_usage = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
    assert extract_usage(no_usage, is_stream=False) is None


@pytest.mark.parametrize(
    "captured",
    [
        b"",
        b"not json at all",
        b'{"usage": ',
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'{"usage": {"something": 1}}',
        b"[1, 2, 3]",
        b'{"id": "x", "choices": []}',
        b'\xff\xfe"usage"\x80',
        b'"usage"',
    ],
)
def test_no_usage_or_junk_in_json(captured: bytes) -> None:
    assert extract_usage(captured, is_stream=False) is None


def test_usage_with_unreadable_counts_counts_zero() -> None:
    raw = b'{"usage": {"prompt_tokens": "12", "completion_tokens": true}}'
    assert extract_usage(raw, is_stream=False) == Usage(0, 0, 0, 0)


@pytest.mark.parametrize(
    "captured",
    [
        b"",
        b"data: [DONE]\n\n",
        b'data: {"usage": \n\n',
        b"event: ping\ndata: usage\n\n",
        b'data: {"usage": null, "choices": []}\n\n',
        b'data: {"type": "response.completed", "response": {"usage": 5}}\n\n',
        b"\x00\xff" * 100,
    ],
)
def test_no_usage_or_junk_in_sse(captured: bytes) -> None:
    assert extract_usage(captured, is_stream=True) is None


def test_negative_or_inconsistent_counts_never_go_negative() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": -5,
            "prompt_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 7},
        }
    }
    got = extract_usage(json.dumps(body).encode(), False)
    assert got == Usage(input=0, cached_input=8, cache_write=2, output=0)
    assert got is not None and got.prompt == 10


# --------------------------------------------------------------------------- pricing


def pricing(**models: Price) -> Pricing:
    return Pricing(
        cache_write_multiplier=1.25,
        cached_input_discount=0.9,
        models=MappingProxyType(dict(models)),
    )


SOL = Price(input=15.0, output=60.0, cached_input=None, cache_write=None)


def test_price_with_default_cache_rates_worked_example() -> None:
    # uncached 500 × 15 + cache reads 400 × 1.5 (90% off) + cache writes 100 × 18.75 (1.25 ×)
    # + output 200 × 60, per 1M tokens = 0.0075 + 0.0006 + 0.001875 + 0.012
    cost = price(EXPECTED, "gpt-5.6-sol", pricing(**{"gpt-5.6-sol": SOL}))
    assert cost == pytest.approx(0.021975, abs=1e-12)
    assert price(Usage(0, 1_000_000, 0, 0), "gpt-5.6-sol", pricing(**{"gpt-5.6-sol": SOL})) == (
        pytest.approx(1.5)
    )
    assert price(Usage(0, 0, 1_000_000, 0), "gpt-5.6-sol", pricing(**{"gpt-5.6-sol": SOL})) == (
        pytest.approx(18.75)
    )


def test_price_with_explicit_cache_prices() -> None:
    explicit = Price(input=15.0, output=60.0, cached_input=3.0, cache_write=20.0)
    cost = price(EXPECTED, "gpt-5.6-sol", pricing(**{"gpt-5.6-sol": explicit}))
    # 500 × 15 + 400 × 3 + 100 × 20 + 200 × 60 = 7500 + 1200 + 2000 + 12000 = 22700 per 1M
    assert cost == pytest.approx(0.0227, abs=1e-12)


def test_price_with_config_multipliers() -> None:
    p = Pricing(
        cache_write_multiplier=2.0,
        cached_input_discount=0.5,
        models=MappingProxyType({"m": Price(10.0, 20.0, None, None)}),
    )
    # 500 × 10 + 400 × 5 + 100 × 20 + 200 × 20 = 5000 + 2000 + 2000 + 4000 per 1M
    assert price(EXPECTED, "m", p) == pytest.approx(0.013, abs=1e-12)


def test_model_without_a_price_costs_nothing() -> None:
    p = pricing(**{"gpt-5.6-sol": SOL})
    assert price(EXPECTED, "gpt-4o-mini", p) == 0.0
    assert price(EXPECTED, None, p) == 0.0


def test_pricing_from_the_config_file_defaults() -> None:
    cfg = config.parse(
        """
upstreams:
  models: {url: "http://127.0.0.1:9"}
routes:
  - {path_prefix: /v1/, product: api, upstream: models}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol]
    phases: {api: preview}
pricing:
  models:
    gpt-5.6-sol: {input: 15.0, output: 60.0}
    gpt-5.6-luna: {input: 1.0, output: 4.0, cached_input: 0.5, cache_write: 1.0}
"""
    )
    assert price(EXPECTED, "gpt-5.6-sol", cfg.pricing) == pytest.approx(0.021975, abs=1e-12)
    # 500 × 1 + 400 × 0.5 + 100 × 1 + 200 × 4 = 1600 per 1M
    assert price(EXPECTED, "gpt-5.6-luna", cfg.pricing) == pytest.approx(0.0016, abs=1e-12)
