"""``access-proxy demo``: everything on one machine for a first look (SPEC §2).

Starts a private Redis, the bundled mock upstream and the proxy; seeds orgs, workspaces, keys and
grants through the admin API, exactly as an operator would (the equivalent ``access-proxy admin``
commands are printed); then prints the keys, the admin tokens and ready-to-paste ``curl`` and
``openai`` SDK commands that show an allowed call, every kind of deny and a workspace paced by
its token budget (``tokens_per_minute`` on the alpha). Ctrl-C stops it all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy import config as config_mod
from proxy import env, eventloop, startup
from proxy.logsetup import configure_logging
from proxy.mock_upstream import MockUpstream
from proxy.redis_server import RedisServer
from proxy.server import build_proxy

DEMO_CONFIG = "demo.yaml"
ACCESS_LOG = "access.log"
ROLES = {
    "ops": ["operator"],
    "provider-review": ["approver:provider"],
    "gov-review": ["approver:government"],
    "dashboards": ["viewer"],
}


ALPHA = "gpt-5.5-alpha"  # paced by tokens_per_minute in proxy/demo.yaml
BIG_PROMPT = {"x-mock-prompt-tokens": "300"}  # the mock answers with this many prompt tokens


@dataclass
class Case:
    title: str
    key_name: str
    path: str
    model: str
    expect: str


def shipped_config() -> str:
    """The demo's config, shipped inside the package (``proxy/demo.yaml``)."""
    return resources.files("proxy").joinpath(DEMO_CONFIG).read_text()


def demo_config(
    port: int, admin_port: int, upstream_port: int, access_log: Path
) -> tuple[str, dict[str, str]]:
    """The shipped demo config with the demo's ports, fresh admin tokens, and every request in
    the access log at ``access_log``."""
    data = yaml.safe_load(shipped_config())
    tokens = {name: secrets.token_urlsafe(24) for name in ROLES}
    data["listen"] = {"host": "127.0.0.1", "port": port}
    data["admin"] = {
        "listen": {"host": "127.0.0.1", "port": admin_port},
        "tokens": [
            {"name": n, "sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": ROLES[n]}
            for n, t in tokens.items()
        ],
    }
    data["upstreams"]["models"]["url"] = f"http://127.0.0.1:{upstream_port}"
    data["access_log"] = {"mode": "all", "path": str(access_log)}
    return yaml.safe_dump(data, sort_keys=False), tokens


class AdminCalls:
    """The operator's side of the demo: admin API calls, each echoed as its CLI command."""

    def __init__(self, session: aiohttp.ClientSession, url: str, tokens: dict[str, str]) -> None:
        self.session = session
        self.url = url
        self.tokens = tokens
        self.commands: list[str] = []

    async def call(
        self, who: str, method: str, path: str, body: Any, cli: str, refused: int | None = None
    ) -> Any:
        """One call; with ``refused``, the call must be refused with that status."""
        token = "" if who == "ops" else f" --token {self.tokens[who]}"
        command = f"access-proxy admin {cli}{token}"
        async with self.session.request(
            method,
            self.url + path,
            json=body,
            headers={"authorization": f"Bearer {self.tokens[who]}"},
        ) as resp:
            doc = await resp.json() if resp.status != 204 else None
            if (resp.status >= 300) != (refused is not None) or (
                refused and resp.status != refused
            ):
                raise RuntimeError(f"{method} {path} -> {resp.status}: {doc}")
        if refused is not None:
            command += f"   # refused: {refused} {(doc or {}).get('error', {}).get('code')}"
        self.commands.append(command)
        return doc


# The requests the demo makes and prints, and what each is answered.
CASES = [
    Case("allowed: org grant, enabled", "acme-research", "/v1", "gpt-5.6-sol", "200"),
    Case("allowed: model in no program", "globex-main", "/v1", "gpt-4o-mini", "200"),
    Case("401 invalid_api_key: revoked key", "revoked", "/v1", "gpt-5.6-sol", "401"),
    Case(
        "403 workspace_suspended",
        "acme-contractors",
        "/v1",
        "gpt-5.6-sol",
        "403 workspace_suspended",
    ),
    Case(
        "403 product_unavailable: chatgpt is closed",
        "acme-research",
        "/chatgpt/v1",
        "gpt-5.6-sol",
        "403 product_unavailable",
    ),
    Case("allowed: alpha grant, alpha model", "initech-lab", "/v1", "gpt-5.5-alpha", "200"),
    Case(
        "404 model_not_found: alpha does not carry over",
        "initech-lab",
        "/v1",
        "gpt-5.6-sol",
        "404 model_not_found",
    ),
    Case(
        "404 model_not_found: an api grant does not open codex",
        "globex-main",
        "/codex/v1",
        "gpt-5.6-sol",
        "404 model_not_found",
    ),
    Case(
        "403 access_pending_review: codex awaits government",
        "acme-research",
        "/codex/v1",
        "gpt-5.6-sol",
        "403 access_pending_review",
    ),
    Case(
        "403 access_not_yet_enabled: next wave",
        "globex-main",
        "/v1",
        "gpt-5.6-sol",
        "403 access_not_yet_enabled",
    ),
    Case(
        "403 access_suspended: workspace grant wins",
        "acme-prod",
        "/v1",
        "gpt-5.6-sol",
        "403 access_suspended",
    ),
]


async def _tenants(admin: AdminCalls) -> dict[str, str]:
    """The orgs, their workspaces and a key for each (and one revoked key)."""
    a = admin.call
    for org, name, rep in (("acme", "Acme", "Dana Reyes"), ("globex", "Globex", "Sam Okafor")):
        await a(
            "ops",
            "POST",
            "/admin/v1/orgs",
            {"id": org, "name": name, "account_representative": rep},
            f"orgs create {org} --account-rep '{rep}'",
        )
    await a(
        "ops", "POST", "/admin/v1/orgs", {"id": "initech", "name": "Initech"}, "orgs create initech"
    )
    for ws, org in [
        ("acme-research", "acme"),
        ("acme-prod", "acme"),
        ("acme-contractors", "acme"),
        ("globex-main", "globex"),
        ("initech-lab", "initech"),
        ("initech-batch", "initech"),
    ]:
        await a(
            "ops",
            "POST",
            "/admin/v1/workspaces",
            {"id": ws, "org_id": org},
            f"workspaces create {ws} --org {org}",
        )
    keys: dict[str, str] = {}
    for ws in [
        "acme-research",
        "acme-prod",
        "acme-contractors",
        "globex-main",
        "initech-lab",
        "initech-batch",
    ]:
        doc = await a(
            "ops", "POST", f"/admin/v1/workspaces/{ws}/keys", {"name": "demo"}, f"keys issue {ws}"
        )
        keys[ws] = doc["key"]
    doc = await a(
        "ops",
        "POST",
        "/admin/v1/workspaces/acme-research/keys",
        {"name": "old"},
        "keys issue acme-research",
    )
    keys["revoked"] = doc["key"]
    await a(
        "ops", "DELETE", f"/admin/v1/keys/{doc['key_id']}", None, f"keys revoke {doc['key_id']}"
    )
    return keys


async def _grant(admin: AdminCalls, subject: str, program: str, product: str, **extra: Any) -> str:
    a = admin.call
    body = {"program": program, "product": product, "subject": subject, **extra}
    doc = await a(
        "ops",
        "POST",
        "/admin/v1/grants",
        body,
        f"grants request --program {program} --product {product} --subject {subject}",
    )
    return str(doc["grant_id"])


async def _approve(
    admin: AdminCalls, gid: str, roles: tuple[str, ...] = ("provider", "government")
) -> None:
    a = admin.call
    reviewers = {
        "provider": ("provider-review", "alice"),
        "government": ("gov-review", "grace"),
    }
    for role in roles:
        who, reviewer = reviewers[role]
        await a(
            who,
            "POST",
            f"/admin/v1/grants/{gid}/approve",
            {"role": role, "reviewer": reviewer},
            f"grants approve {gid} --role {role} --reviewer {reviewer}",
        )


async def _enable(admin: AdminCalls, gid: str, at: str | None = None) -> None:
    a = admin.call
    await a(
        "ops",
        "POST",
        f"/admin/v1/grants/{gid}/enable",
        {"at": at} if at else {},
        f"grants enable {gid}" + (f" --at {at}" if at else ""),
    )


async def _grants(admin: AdminCalls) -> None:
    """Grants in every state the demo shows, and the refusals of the admin API it shows."""
    a = admin.call
    # Acme is approved for the preview on the API, org-wide, and enabled now.
    g = await _grant(admin, "org:acme", "gpt-5.6-preview", "api")
    await _approve(admin, g)
    await _enable(admin, g)
    # ...but acme-prod's own grant is suspended: the workspace grant decides.
    g = await _grant(admin, "workspace:acme-prod", "gpt-5.6-preview", "api")
    await _approve(admin, g)
    await _enable(admin, g)
    await a(
        "ops",
        "POST",
        f"/admin/v1/grants/{g}/suspend",
        {"reason": "demo"},
        f"grants suspend {g} --reason demo",
    )
    # Codex for Acme awaits the government's sign-off.
    g = await _grant(admin, "org:acme", "gpt-5.6-preview", "codex")
    await _approve(admin, g, ("provider",))
    # Globex: approved, switched on in a later wave.
    g = await _grant(admin, "org:globex", "gpt-5.6-preview", "api")
    await _approve(admin, g)
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7 * 86400))
    await _enable(admin, g, later)
    # Initech took part in the alpha: that does not carry over to the preview.
    g = await _grant(admin, "org:initech", "gpt-5.5-alpha", "api")
    await _approve(admin, g, ("provider",))
    await _enable(admin, g)
    # Hooli works with no account representative: the preview cannot even be requested for it.
    await a("ops", "POST", "/admin/v1/orgs", {"id": "hooli"}, "orgs create hooli")
    await a(
        "ops",
        "POST",
        "/admin/v1/grants",
        {"program": "gpt-5.6-preview", "product": "api", "subject": "org:hooli"},
        "grants request --program gpt-5.6-preview --product api --subject org:hooli",
        refused=422,
    )
    # acme-contractors: the workspace is suspended by an operator.
    await a(
        "ops",
        "POST",
        "/admin/v1/workspaces/acme-contractors/suspend",
        {"reason": "demo"},
        "workspaces suspend acme-contractors --reason demo",
    )


async def seed(admin: AdminCalls) -> tuple[dict[str, str], list[Case]]:
    """Seed through the admin API (recording each call as a CLI command): tenants and keys, then
    the grants; the keys by workspace and the cases to try."""
    keys = await _tenants(admin)
    await _grants(admin)
    return keys, list(CASES)


def _curl(port: int, case: Case, key: str) -> str:
    body = json.dumps({"model": case.model, "messages": [{"role": "user", "content": "hello"}]})
    return (
        f"curl -s http://127.0.0.1:{port}{case.path}/chat/completions "
        f"-H 'authorization: Bearer {key}' -H 'content-type: application/json' -d '{body}'"
    )


async def check_cases(
    session: aiohttp.ClientSession, port: int, keys: dict[str, str], cases: list[Case]
) -> list[str]:
    lines = []
    for case in cases:
        async with session.post(
            f"http://127.0.0.1:{port}{case.path}/chat/completions",
            json={"model": case.model, "messages": [{"role": "user", "content": "hello"}]},
            headers={"authorization": f"Bearer {keys[case.key_name]}"},
        ) as resp:
            doc = await resp.json()
            got = str(resp.status)
            if resp.status >= 400:
                got += " " + doc["error"]["code"]
        mark = "ok " if got.startswith(case.expect) else "?? "
        lines.append(f"  {mark}{case.title:<52} -> {got}")
    return lines


_WS_HEADERS = (
    "-H 'connection: upgrade' -H 'upgrade: websocket' -H 'sec-websocket-version: 13' "
    "-H 'sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ=='"
)


async def check_realtime(
    session: aiohttp.ClientSession, port: int, keys: dict[str, str]
) -> list[str]:
    """The Realtime API: a session opened for a granted key, and one refused before upgrading."""
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-5.6-sol"
    lines = []
    for title, name, expect in (
        ("realtime allowed: session opened", "acme-research", "101 session.created"),
        ("realtime 404 model_not_found: refused before upgrade", "initech-lab", "404"),
    ):
        headers = {"authorization": f"Bearer {keys[name]}"}
        try:
            async with session.ws_connect(url, headers=headers) as ws:
                got = "101 " + (await ws.receive_json(timeout=10))["type"]
        except aiohttp.WSServerHandshakeError as exc:
            got = str(exc.status)
        mark = "ok " if got == expect else "?? "
        lines.append(f"  {mark}{title:<52} -> {got}")
    return lines


async def check_multipart(
    session: aiohttp.ClientSession, port: int, keys: dict[str, str]
) -> list[str]:
    """A multipart upload naming a preview model (an audio transcription) without a grant."""
    form = aiohttp.FormData()
    form.add_field("model", "gpt-5.6-sol")
    form.add_field("file", b"RIFF....WAVEfmt ", filename="hello.wav", content_type="audio/wav")
    async with session.post(
        f"http://127.0.0.1:{port}/v1/audio/transcriptions",
        data=form,
        headers={"authorization": f"Bearer {keys['initech-lab']}"},
    ) as resp:
        got = str(resp.status)
        if resp.status >= 400:
            got += " " + (await resp.json())["error"]["code"]
    title = "multipart 404 model_not_found: model form field read"
    mark = "ok " if got == "404 model_not_found" else "?? "
    return [f"  {mark}{title:<52} -> {got}"]


async def check_token_limit(
    session: aiohttp.ClientSession, port: int, keys: dict[str, str]
) -> list[str]:
    """initech-batch spends its alpha token budget with large prompts until it is refused."""
    statuses: list[str] = []
    budget = "?"
    body = {"model": ALPHA, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"authorization": f"Bearer {keys['initech-batch']}", **BIG_PROMPT}
    for _ in range(10):
        async with session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            left = resp.headers.get("x-ratelimit-remaining-tokens", "?")
            budget = resp.headers.get("x-ratelimit-limit-tokens", budget)
            if resp.status == 200:
                statuses.append(f"200 ({left} left)")
                continue
            code = (await resp.json())["error"]["code"]
            statuses.append(f"{resp.status} {code}, retry-after {resp.headers.get('retry-after')}s")
            break
    refused = statuses[-1].startswith("429 rate_limit_exceeded")
    title = f"token limit: {budget} tokens/min of the alpha"
    return [f"  {'ok ' if refused else '?? '}{title:<52} -> {', '.join(statuses)}"]


async def demo(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    shutil.rmtree(state, ignore_errors=True)
    startup.state_dir(str(state))
    text, tokens = demo_config(args.port, args.admin_port, args.upstream_port, state / ACCESS_LOG)
    cfg_path = state / "proxy.yaml"
    cfg_path.write_text(text)
    env.set_default("UPSTREAM_API_KEY", "demo-upstream-key")
    cfg = config_mod.load(str(cfg_path))
    for what, flag, port in (
        ("data listener", "--port", args.port),
        ("admin listener", "--admin-port", args.admin_port),
        ("mock upstream", "--upstream-port", args.upstream_port),
    ):
        startup.port_free(what, flag, "127.0.0.1", port)

    redis = RedisServer(state / "redis", persistent=False)
    await startup.start_embedded(redis)
    upstream = MockUpstream()
    proxy = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await upstream.start("127.0.0.1", args.upstream_port)
        except OSError as exc:
            raise startup.bind_error(
                "mock upstream", "--upstream-port", "127.0.0.1", args.upstream_port, exc
            ) from None
        env.set_default("ACCESS_PROXY_PEPPER", "v1:" + secrets.token_urlsafe(24))
        proxy = await build_proxy(cfg, redis_url=redis.url, config_path=str(cfg_path))
        await proxy.start()
        async with aiohttp.ClientSession() as session:
            admin = AdminCalls(session, f"http://127.0.0.1:{args.admin_port}", tokens)
            keys, cases = await seed(admin)
            results = await check_cases(session, args.port, keys, cases)
            results += await check_realtime(session, args.port, keys)
            results += await check_multipart(session, args.port, keys)
            results += await check_token_limit(session, args.port, keys)
        print(report(args, tokens, keys, cases, admin.commands, results), flush=True)
        await stop.wait()
    finally:
        if proxy is not None:
            with contextlib.suppress(Exception):  # after a failed start, the first error counts
                await proxy.stop()
        await upstream.stop()
        await redis.stop()
    return 0


def _client_examples(port: int, key: str) -> list[str]:
    """The openai SDK and a realtime WebSocket session, as scripts to paste."""
    return [
        "With the openai SDK:",
        "  python - <<'EOF'",
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='{key}')",
        "  r = client.chat.completions.create(model='gpt-5.6-sol', "
        "messages=[{'role': 'user', 'content': 'hello'}])",
        "  print(r.choices[0].message.content, r.usage)",
        "  for chunk in client.chat.completions.create(model='gpt-5.6-sol', stream=True, "
        "messages=[{'role': 'user', 'content': 'hello'}]):",
        "      print(chunk.choices[0].delta.content if chunk.choices else '', end='')",
        "  EOF",
        "",
        "A realtime session (WebSocket), with aiohttp:",
        "  python - <<'EOF'",
        "  import asyncio, aiohttp",
        "  async def main():",
        "      async with aiohttp.ClientSession() as s, s.ws_connect(",
        f"          'ws://127.0.0.1:{port}/v1/realtime?model=gpt-5.6-sol',",
        f"          headers={{'authorization': 'Bearer {key}'}}) as ws:",
        "          print(await ws.receive_json())",
        "          await ws.send_json({'type': 'response.create'})",
        "          async for msg in ws:",
        "              print(msg.data)",
        "              if '\"response.done\"' in msg.data: break",
        "  asyncio.run(main())",
        "  EOF",
        "",
    ]


def report(
    args: argparse.Namespace,
    tokens: dict[str, str],
    keys: dict[str, str],
    cases: list[Case],
    commands: list[str],
    results: list[str],
) -> str:
    port, admin_port = args.port, args.admin_port
    out = [
        "",
        "access-proxy demo is running",
        f"  data plane   http://127.0.0.1:{port}   (routes /v1, /codex/v1, /chatgpt/v1)",
        f"  admin API    http://127.0.0.1:{admin_port}   (/healthz /readyz /metrics /admin/v1/...)",
        f"  mock model   http://127.0.0.1:{args.upstream_port}",
        "",
        "Admin tokens (roles):",
        *(f"  {n:<16} {t}   {', '.join(ROLES[n])}" for n, t in tokens.items()),
        "",
        "API keys:",
        *(f"  {ws:<17} {k}" for ws, k in keys.items()),
        "",
        "Seeded through the admin API, as these operator commands:",
        f"  export ACCESS_PROXY_ADMIN_URL=http://127.0.0.1:{admin_port}",
        f"  export ACCESS_PROXY_ADMIN_TOKEN={tokens['ops']}",
        *(f"  {c}" for c in commands),
        "",
        "Every case, checked just now:",
        *results,
        "",
        "Try them:",
    ]
    for case in cases:
        out += [f"  # {case.title}", "  " + _curl(port, case, keys[case.key_name])]
    out += [
        "  # streaming",
        f"  curl -sN http://127.0.0.1:{port}/v1/chat/completions -H 'authorization: Bearer "
        f"{keys['acme-research']}' -H 'content-type: application/json' -d '{{\"model\": "
        '"gpt-5.6-sol", "stream": true, "messages": [{"role": "user", "content": "hi"}]}\'',
        "  # realtime: a WebSocket upgrade without a grant is refused before upgrading",
        f"  curl -si 'http://127.0.0.1:{port}/v1/realtime?model=gpt-5.6-sol' {_WS_HEADERS} "
        f"-H 'authorization: Bearer {keys['initech-lab']}'",
        "  # multipart: the model form field of an upload is read and decided (refused: no grant)",
        f"  curl -s http://127.0.0.1:{port}/v1/audio/transcriptions -H 'authorization: Bearer "
        f"{keys['initech-lab']}' -F model=gpt-5.6-sol -F file=@/etc/hostname",
        "  # token limit: 1000 tokens a minute of the alpha per workspace (300-token prompts here)",
        f"  curl -si http://127.0.0.1:{port}/v1/chat/completions -H 'authorization: Bearer "
        f"{keys['initech-lab']}' -H 'content-type: application/json' -H "
        '\'x-mock-prompt-tokens: 300\' -d \'{"model": "gpt-5.5-alpha", "messages": '
        '[{"role": "user", "content": "hi"}]}\' | grep -i -e "^HTTP" -e ratelimit-.*-tokens',
        "  # usage and cost per UTC day (admin usage show acme-research --from YYYY-MM-DD)",
        f"  curl -s 'http://127.0.0.1:{admin_port}/admin/v1/workspaces/acme-research/usage"
        f"?from={time.strftime('%Y-%m-%d', time.gmtime())}' -H 'authorization: Bearer "
        f"{tokens['dashboards']}'",
        "  # what this key may use",
        f"  curl -s http://127.0.0.1:{port}/v1/models -H 'authorization: Bearer "
        f"{keys['acme-research']}'",
        "  # why a request is refused",
        f"  curl -s 'http://127.0.0.1:{admin_port}/admin/v1/explain?workspace=globex-main"
        f"&product=api&model=gpt-5.6-sol' -H 'authorization: Bearer {tokens['dashboards']}'",
        "  # the same through the operator CLI (after the two exports above)",
        "  access-proxy admin explain --workspace globex-main --product api --model gpt-5.6-sol",
        "",
        *_client_examples(port, keys["acme-research"]),
        f"Access log (every request, JSON lines): tail -f {Path(args.state_dir) / ACCESS_LOG}",
        f"Metrics: curl -s http://127.0.0.1:{admin_port}/metrics"
        " | grep -e access_proxy_requests_total -e access_proxy_tokens_total",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(out)


def run_demo(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return eventloop.run(demo(args))
    except eventloop.LoopUnavailable as exc:
        return startup.fail(startup.StartupError(str(exc), eventloop.FIX))
    except startup.StartupError as exc:
        return startup.fail(exc)
    return 0
