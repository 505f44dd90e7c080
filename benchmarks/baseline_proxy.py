"""The benchmark's baseline: a bare aiohttp pass-through proxy with no enforcement at all.

It is set up as access-proxy's data plane is (the same event loop, see ``proxy.eventloop``; a
low-level ``web.Server`` handler under a ``ServerRunner``, one shared client session made by
``proxy.dataplane.forward.make_session``, the answer streamed back chunk by chunk), so the
difference measured against it is the cost of enforcement and nothing else.

``--client pool`` forwards with access-proxy's own upstream client
(``proxy.dataplane.client.UpstreamPool``) instead of aiohttp's: the same bare pass-through on the
proxy's forward path, so the cost of enforcement alone can be read against it.

Run: ``python benchmarks/baseline_proxy.py --port 8081 --upstream http://127.0.0.1:8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from proxy import eventloop
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import make_session

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _pass_through(headers: MultiMapping[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _HOP_BY_HOP:
            out.add(name, value)
    return out


class Baseline:
    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream.rstrip("/")
        self.session = session

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        try:
            upstream_resp = await self.session.request(
                request.method,
                URL(self.upstream + request.raw_path, encoded=True),
                data=body or None,
                headers=_pass_through(request.headers),
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError):
            return web.Response(status=502, text="upstream unreachable")
        try:
            response = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
            response.headers.update(_pass_through(upstream_resp.headers))
            await response.prepare(request)
            while chunk := await upstream_resp.content.readany():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream_resp.release()


class PoolBaseline:
    """The same pass-through on access-proxy's upstream client."""

    def __init__(self, upstream: str, pool: UpstreamPool) -> None:
        self.upstream = upstream.rstrip("/")
        self.pool = pool

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        try:
            answer = await self.pool.request(
                self.upstream,
                request.method,
                request.raw_path,
                _pass_through(request.headers).items(),
                body,
                connect_s=5.0,
                first_byte_s=120.0,
                idle_s=60.0,
            )
        except OSError:
            return web.Response(status=502, text="upstream unreachable")
        try:
            response = web.StreamResponse(status=answer.status, reason=answer.reason or None)
            response.headers.update(_pass_through(answer.headers))
            await response.prepare(request)
            while chunk := await answer.read_some():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            answer.release()


async def serve(host: str, port: int, upstream: str, client: str) -> None:
    session = make_session()
    pool = UpstreamPool()
    handler = (
        PoolBaseline(upstream, pool).handle
        if client == "pool"
        else Baseline(upstream, session).handle
    )
    server = web.Server(handler, handler_cancellation=True)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"baseline proxy on {host}:{port} -> {upstream}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()
    await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8089")
    parser.add_argument(
        "--client", choices=("aiohttp", "pool"), default="aiohttp", help="the upstream client"
    )
    args = parser.parse_args(argv)
    eventloop.run(serve(args.host, args.port, args.upstream, args.client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
