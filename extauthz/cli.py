"""``extauthz`` command line: ``serve``, ``policy lint``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .authorizer import Authorizer
from .config import DEFAULT_LISTEN, Settings
from .errors import ConfigError, PolicyError, PolicySetError
from .policy.engine import DEFAULT_ROOT_NAMESPACE, PolicySet
from .server import Server, run
from .telemetry import Telemetry

log = logging.getLogger("extauthz")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT or unix:/path")
    p.add_argument("--policies", type=Path, help="directory of policy YAML (default: none)")
    p.add_argument(
        "--root-namespace",
        default=DEFAULT_ROOT_NAMESPACE,
        help="policies in this namespace apply mesh-wide (Istio's rootNamespace)",
    )
    p.add_argument(
        "--namespace",
        dest="workload_namespace",
        help="namespace of the protected workload when Envoy does not say",
    )
    p.add_argument(
        "--labels",
        dest="workload_labels",
        help="labels of the protected workload (app=orders,version=v1)",
    )
    p.add_argument(
        "--xff-trusted-hops",
        type=int,
        default=0,
        help="trusted proxies in front of Envoy, for remote.ip (Istio numTrustedProxies)",
    )
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds to drain in-flight checks on SIGTERM"
    )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        listen=args.listen,
        policies=args.policies,
        root_namespace=args.root_namespace,
        workload_namespace=args.workload_namespace,
        workload_labels=args.workload_labels,
        xff_trusted_hops=args.xff_trusted_hops,
        grace_seconds=args.grace,
    )


def load_policies(settings: Settings) -> PolicySet:
    if settings.policies is None:
        return PolicySet.empty()
    return PolicySet.load(settings.policies, root_namespace=settings.root_namespace)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    policies = load_policies(settings)
    if settings.policies is None:
        log.warning("no --policies: every request is allowed and no token is checked")
    server = Server(
        Authorizer(policies, settings),
        Telemetry.from_env(),
        listen=settings.listen,
        grace=settings.grace_seconds,
    )
    asyncio.run(run(server))
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    policies = PolicySet.load(args.directory, root_namespace=args.root_namespace)
    for warning in policies.source.warnings:
        print(f"warning: {warning}")
    print(
        f"{args.directory}: {len(policies.authz)} AuthorizationPolicy, "
        f"{len(policies.authn)} RequestAuthentication in {len(policies.source.files)} file(s): OK"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .devtools.demo import main as demo_main

    return demo_main(once=args.once, workdir=args.workdir)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="extauthz", description=__doc__)
    ap.add_argument("--version", action="version", version=f"extauthz {__version__}")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the ext_authz gRPC server")
    _serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    lint = policy_sub.add_parser("lint", help="load and validate a policy directory")
    lint.add_argument("directory", type=Path)
    lint.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    lint.set_defaults(func=cmd_lint)
    demo = sub.add_parser("demo", help="run the local demo mesh (development only)")
    demo.add_argument("--once", action="store_true", help="play the scenario once and exit")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"))
    demo.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except PolicySetError as exc:
        for err in exc.errors:
            print(f"error: {err.message}", file=sys.stderr)
        return 1
    except (PolicyError, ConfigError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
