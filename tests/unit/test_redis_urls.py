"""The Redis URL forms of SPEC §2: what parses to which topology, and located errors for the rest
(through ``config check`` too)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.store.topology import parse_url
from tests.integration.conftest import config_text


@pytest.mark.parametrize(
    ("url", "kind", "tls", "nodes", "service", "db"),
    [
        ("redis://h:1/0", "single", False, (), "", 0),
        ("rediss://h:1/0", "single", True, (), "", 0),
        ("unix:///tmp/r.sock?db=2", "single", False, (), "", 0),
        (
            "redis+sentinel://a:1,b:2,c:3/mymaster",
            "sentinel",
            False,
            (("a", 1), ("b", 2), ("c", 3)),
            "mymaster",
            0,
        ),
        ("rediss+sentinel://:pw@a:1/m/4", "sentinel", True, (("a", 1),), "m", 4),
        ("redis+cluster://a:1,b:2", "cluster", False, (("a", 1), ("b", 2)), "", 0),
        ("rediss+cluster://u:p@a:1", "cluster", True, (("a", 1),), "", 0),
        ("redis+cluster://[::1]:7000", "cluster", False, (("::1", 7000),), "", 0),
    ],
)
def test_forms(url: str, kind: str, tls: bool, nodes: tuple, service: str, db: int) -> None:
    target = parse_url(url)
    assert (target.kind, target.tls, target.nodes, target.service, target.db) == (
        kind,
        tls,
        nodes,
        service,
        db,
    )


def test_credentials_and_options() -> None:
    t = parse_url("redis+sentinel://user:p%40ss@a:1/m?sentinel_password=s3&ssl_ca_certs=/ca.pem")
    assert (t.username, t.password, t.sentinel_password, t.ssl_ca_certs) == (
        "user",
        "p@ss",
        "s3",
        "/ca.pem",
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:6379", "redis://host:port"),
        ("http://h:1", "unknown scheme"),
        ("redis+sentinel://a:1", "master's name"),
        ("redis+sentinel://a:1/m/x", "database must be a number"),
        ("redis+sentinel://a:1/m/1/2", "master's name"),
        ("redis+cluster://a:1/0", "one database"),
        ("redis+cluster://", "at least one host"),
        ("redis+cluster://a", "not host:port"),
        ("redis+cluster://a:port", "not host:port"),
        ("redis+mesh://a:1", "unknown scheme"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_url(url)


def test_config_check_names_a_bad_redis_url() -> None:
    text = config_text().replace("redis:", "redis:\n  url: redis+sentinel://a:1\n", 1)
    if "url: redis+sentinel" not in text:
        text += "\nredis:\n  url: redis+sentinel://a:1\n"
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    assert "redis.url" in str(err.value) and "master's name" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_says_why(text: str) -> None:
    try:
        target = parse_url(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert target.kind in ("single", "sentinel", "cluster")


@pytest.mark.parametrize(
    "url", ["redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster", "redis+cluster://127.0.0.1:1"]
)
async def test_an_unreachable_topology_is_one_startup_error(url: str) -> None:
    from proxy.startup import StartupError, redis_reachable

    with pytest.raises(StartupError, match="unreachable"):
        await redis_reachable(url, deadline_s=0.3)


async def test_a_malformed_url_is_one_startup_error() -> None:
    from proxy.startup import StartupError, redis_reachable

    with pytest.raises(StartupError, match="not usable"):
        await redis_reachable("redis+cluster://nohostport", deadline_s=0.3)
