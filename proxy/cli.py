"""The ``access-proxy`` command: ``serve``, ``demo``, ``config check`` and ``admin`` (SPEC §2)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from proxy.admin.cli import add_admin_parser

    parser = argparse.ArgumentParser(
        prog="access-proxy", description="Access enforcement for limited-preview model families."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy (data and admin listeners)")
    serve.add_argument(
        "--config", help="config file (default: env ACCESS_PROXY_CONFIG or config/proxy.yaml)"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the data port")

    demo = sub.add_parser("demo", help="everything on one machine, seeded, for a first look")
    demo.add_argument("--port", type=int, default=8080, help="data port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (default 9090)")
    demo.add_argument("--upstream-port", type=int, default=8089, help="mock upstream port")
    demo.add_argument("--state-dir", default=".state/demo", help="where the demo keeps Redis data")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file as serve would")
    check.add_argument("path", nargs="?", help="config file")
    check.add_argument(
        "--diff", nargs=2, metavar=("OLD", "NEW"), help="show what would change in effect"
    )

    add_admin_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "proxy":
            raise  # the package itself is broken: a bug, with its traceback
        # An install older than the code (a dependency added since): one line, as at start-up.
        print(
            f"access-proxy: the dependency {exc.name!r} is not installed ({exc}); reinstall "
            "access-proxy (`make install` in the repository, or `pip install -e .`)",
            file=sys.stderr,
            flush=True,
        )
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from proxy.server import run_serve

        return run_serve(args.config, max(1, args.workers))
    if args.command == "demo":
        from proxy.demo import run_demo

        return run_demo(args)
    if args.command == "config":
        from proxy.configdiff import check_command, diff_command

        if args.diff:
            return diff_command(args.diff[0], args.diff[1])
        return check_command(args.path)
    from proxy.admin.cli import run_admin

    return run_admin(args)


if __name__ == "__main__":
    sys.exit(main())
