"""``extauthz`` command line: ``serve``, ``check``, ``policy lint|test``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__, policytest
from .authorizer import Authorizer
from .config import DEFAULT_LISTEN, Settings
from .decisionlog import settings as decision_log_flags
from .decisionlog.log import DecisionLog
from .errors import ConfigError, PolicyError, PolicySetError
from .identity.jwks import FetchSettings, KeySetRegistry
from .identity.mint import DEFAULT_ISSUER, TokenMinter, load_signing_key
from .jwks_server import JwksServer
from .policy.engine import DEFAULT_ROOT_NAMESPACE, PolicySet
from .policy.lint import lint
from .policy.source import load_text
from .probe import parse_probe
from .reload import PolicyReloader
from .server import Server, run
from .telemetry import Telemetry
from .tls import ReloadingCredentials, TlsFiles
from .workers import READY, Supervisor, check_plan, for_worker

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
        "--trust-domain",
        dest="trust_domains",
        action="append",
        default=[],
        metavar="TD",
        help="accept only SPIFFE peers of this trust domain (repeat for several; default: any)",
    )
    p.add_argument(
        "--trust-xfcc",
        action="store_true",
        help="identify the caller by x-forwarded-client-cert (its first element) when present; "
        "only if every proxy in front sets/sanitizes it. Default: ignore it and strip it",
    )
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds to drain in-flight checks on SIGTERM"
    )
    p.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="on SIGTERM, report NOT_SERVING but keep answering for S seconds before closing, "
        "so health-checking clients (Envoy, Kubernetes) move away first (default 0)",
    )
    _jwks_fetch_args(p)
    p.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks of --policies for changes (0: reload on SIGHUP only)",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        metavar="PATH",
        help="PEM private key (EC P-256/P-384, RSA >= 2048, Ed25519) that signs the tokens "
        "'token:' rules mint (default: none; such rules then answer 503)",
    )
    p.add_argument(
        "--token-issuer",
        default=DEFAULT_ISSUER,
        help=f"'iss' of minted tokens (default: {DEFAULT_ISSUER})",
    )


def _workers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N server processes under a supervisor, worker i on --listen's port + i "
        "(unix:/x.sock: /x-i.sock); give Envoy one endpoint per worker (default 1: one "
        "process, no supervisor)",
    )
    # Set by the supervisor on the command lines of its workers.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)


def _workers(text: str) -> int:
    return int(_number(text, int, 1, "a number of workers >= 1"))


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS with this certificate"
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by these CAs (mTLS from Envoy); all three "
        "files are re-read when they change, without a restart",
    )


def _jwks_listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jwks-listen",
        metavar="HOST:PORT",
        help="serve the --signing-key's public JWKS over HTTP here, for upstreams to verify "
        "minted tokens (default: off)",
    )


def _metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve the metrics for Prometheus to scrape at http://HOST:PORT/metrics "
        "(default: off; OTLP export is set by OTEL_METRICS_EXPORTER)",
    )


def _jwks_fetch_args(p: argparse.ArgumentParser) -> None:
    d = FetchSettings()
    p.add_argument(
        "--jwks-refresh-interval",
        type=_seconds,
        default=d.refresh_interval,
        metavar="S",
        help="longest a fetched JWKS is kept before it is fetched again; a longer max-age is "
        f"cut to it (default {d.refresh_interval:g})",
    )
    p.add_argument(
        "--jwks-min-refetch-interval",
        type=_seconds,
        default=d.min_refetch_interval,
        metavar="S",
        help="shortest time between two fetches of one JWKS, and so the rate limit of the "
        f"refetch an unknown kid triggers (default {d.min_refetch_interval:g})",
    )
    p.add_argument(
        "--jwks-timeout",
        type=_seconds,
        default=d.timeout,
        metavar="S",
        help="timeout of one JWKS or discovery request (a jwtRule's timeout overrides it); "
        f"also the longest a Check waits for an unknown kid's refetch (default {d.timeout:g})",
    )
    p.add_argument(
        "--jwks-ca-file",
        metavar="PEM",
        help="CA bundle to verify https JWKS/OIDC endpoints with (default: the system's)",
    )


def _number(text: str, convert: Callable[[str], float], minimum: float, what: str) -> float:
    try:
        value = convert(text)
    except ValueError:
        value = minimum - 1
    if not value >= minimum:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _seconds(text: str) -> float:
    return _number(text, float, 0.001, "seconds > 0")


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve the admin gRPC service (explain decisions, policy status) on this separate "
        "listener; it shows request details: keep it on localhost (default: off)",
    )
    p.add_argument(
        "--recent-decisions",
        type=_count,
        default=1024,
        metavar="N",
        help="recent decisions the admin service can explain by id (0: none are recorded)",
    )


def _count(text: str) -> int:
    return int(_number(text, int, 0, "a number >= 0"))


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        listen=args.listen,
        policies=args.policies,
        root_namespace=args.root_namespace,
        workload_namespace=args.workload_namespace,
        workload_labels=args.workload_labels,
        xff_trusted_hops=args.xff_trusted_hops,
        trust_domains=frozenset(args.trust_domains),
        trust_xfcc=args.trust_xfcc,
        jwks=FetchSettings(
            refresh_interval=args.jwks_refresh_interval,
            min_refetch_interval=min(args.jwks_min_refetch_interval, args.jwks_refresh_interval),
            timeout=args.jwks_timeout,
            ca_file=args.jwks_ca_file,
        ),
        grace_seconds=args.grace,
        drain_delay=args.drain_delay,
        reload_interval=args.reload_interval,
        admin_listen=getattr(args, "admin_listen", None),
        recent_decisions=getattr(args, "recent_decisions", 1024),
        signing_key=args.signing_key,
        token_issuer=args.token_issuer,
        jwks_listen=getattr(args, "jwks_listen", None),
        decision_log=decision_log_flags.from_args(args),
        metrics_listen=getattr(args, "metrics_listen", None),
    )


def _tls(args: argparse.Namespace) -> ReloadingCredentials | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together")
    return ReloadingCredentials(TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca))


def open_decision_log(
    settings: Settings, authorizer: Authorizer, telemetry: Telemetry
) -> DecisionLog | None:
    """``--decision-log``, counting its records with the server's meters (not the global,
    no-op provider: its drop counter is the one signal that denies went unrecorded)."""
    if settings.decision_log is None:
        return None
    return DecisionLog.open(
        settings.decision_log, workload=authorizer.workload, meter_provider=telemetry.meter_provider
    )


def token_minter(settings: Settings) -> TokenMinter | None:
    """The minter of ``--signing-key`` (read here, once), or None without one."""
    if settings.signing_key is None:
        return None
    if not settings.token_issuer:
        raise ConfigError("--token-issuer must not be empty")
    return TokenMinter(load_signing_key(settings.signing_key), settings.token_issuer)


def load_policies(settings: Settings, keys: KeySetRegistry | None = None) -> PolicySet:
    if settings.policies is None:
        return PolicySet.empty()
    return PolicySet.load(settings.policies, root_namespace=settings.root_namespace, keys=keys)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers > 1 and args.worker_index is None:
        return supervise(args)
    settings = _settings(args)
    if args.worker_index is not None:
        settings = for_worker(settings, args.worker_index, args.workers)
    keys = KeySetRegistry(settings.jwks)
    policies = load_policies(settings, keys)
    keys.retain(policies.key_sets)
    if settings.policies is None:
        log.warning("no --policies: every request is allowed and no token is checked")
    if settings.workload_namespace is not None:
        # Select and index the default workload's policies before the first request.
        policies.warm([(settings.workload_namespace, settings.workload_labels, frozenset())])
    minter = token_minter(settings)
    jwks = None
    if settings.jwks_listen is not None:
        if minter is None:
            raise ConfigError("--jwks-listen needs --signing-key: there is no key to publish")
        jwks = JwksServer(settings.jwks_listen, minter.key, minter.issuer)
    if minter is None and policies.mints_tokens:
        log.warning(
            "policies have 'token:' rules but there is no --signing-key: "
            "the requests they allow are answered 503 token_signing_unconfigured"
        )
    authorizer = Authorizer(policies, settings, minter=minter)
    reloader = (
        PolicyReloader(
            authorizer,
            settings.policies,
            root_namespace=settings.root_namespace,
            interval=settings.reload_interval,
            keys=keys,
        )
        if settings.policies is not None
        else None
    )
    telemetry = Telemetry.from_env(metrics_listen=settings.metrics_listen)
    telemetry.observe_keys(keys)
    decision_log = open_decision_log(settings, authorizer, telemetry)
    server = Server(
        authorizer,
        telemetry,
        tls=_tls(args),
        listen=settings.listen,
        grace=settings.grace_seconds,
        drain_delay=settings.drain_delay,
        reload=reloader,
        admin_listen=settings.admin_listen,
        recent_decisions=settings.recent_decisions,
        jwks=jwks,
        decision_log=decision_log,
    )
    try:
        asyncio.run(run(server, _ready_signal(args.worker_ready_fd)))
    finally:
        keys.close()
        if decision_log is not None:
            decision_log.close()  # a no-op after the server's graceful stop
    return 0


def supervise(args: argparse.Namespace) -> int:
    """``--workers N``: check the plan, then run and watch N ``serve`` processes."""
    settings = _settings(args)
    plans = check_plan(settings, args.workers)
    for i, plan in enumerate(plans):
        extra = [
            f"{flag} {value}"
            for flag, value in (
                ("metrics", plan.metrics_listen),
                ("admin", plan.admin_listen),
                ("jwks", plan.jwks_listen),
                ("decision log", plan.decision_log.path if plan.decision_log else None),
            )
            if value is not None
        ]
        log.info("worker %d: %s", i, ", ".join([plan.listen, *extra]))

    def command(index: int, ready_fd: int) -> list[str]:
        # The supervisor's own command line, plus the worker's index: flags given twice take
        # the last value, and the worker derives its addresses from the index.
        return [
            sys.executable,
            "-m",
            "extauthz",
            *args.argv,
            "--worker-index",
            str(index),
            "--worker-ready-fd",
            str(ready_fd),
        ]

    supervisor = Supervisor(
        [plan.listen for plan in plans],
        command,
        grace=settings.grace_seconds + settings.drain_delay,
    )
    return supervisor.run()


def _ready_signal(fd: int | None) -> Callable[[], None] | None:
    """A worker's "serving" message to its supervisor, or None outside a supervisor."""
    if fd is None:
        return None

    def ready() -> None:
        try:
            os.write(fd, READY)
        finally:
            os.close(fd)

    return ready


def cmd_lint(args: argparse.Namespace) -> int:
    policies = PolicySet.load(args.directory, root_namespace=args.root_namespace)
    for warning in policies.source.warnings:
        print(f"warning: {warning}")
    found = lint(policies)
    for w in found:
        print(f"warning: {w}")
    print(
        f"{args.directory}: {len(policies.authz)} AuthorizationPolicy, "
        f"{len(policies.authn)} RequestAuthentication in {len(policies.source.files)} file(s): "
        + (f"{len(found)} warning(s)" if found else "OK")
    )
    return 1 if args.strict and (found or policies.source.warnings) else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    report = policytest.run(
        args.directory, settings=Settings(root_namespace=args.root_namespace), match=args.run
    )
    for err in report.errors:
        print(f"error: {err}")
    for r in report.results:
        if r.passed and not args.verbose:
            continue
        print(f"{'PASS' if r.passed else 'FAIL'}: {r.file}:{r.line}: {r.name}")
        for problem in r.problems:
            print(f"    {problem}")
        if not r.passed and r.explanation is not None:
            print("\n".join(f"    | {line}" for line in r.explanation.lines()))
    failed = sum(not r.passed for r in report.results)
    if not report.results and not report.errors:
        print(f"error: no test cases found in {args.directory} (*.test.yaml)")
    print(f"{len(report.results) - failed}/{len(report.results)} passed, {failed} failed")
    return 0 if report.passed else 1


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    text = sys.stdin.read() if str(args.request) == "-" else args.request.read_text()
    docs = list(load_text(text, str(args.request)))
    if len(docs) != 1:
        raise ConfigError(f"{args.request}: expected one request description")
    probe = parse_probe(docs[0].body)
    # A real token needs the real keys: fetch remote JWKS unless claims stand in for it.
    keys = KeySetRegistry(settings.jwks, live=probe.claims is None)
    try:
        authorizer = Authorizer(
            load_policies(settings, keys), settings, minter=token_minter(settings)
        )
        explanation = authorizer.explain(probe.input, claims=probe.claims)
    finally:
        keys.close()
    print("\n".join(explanation.lines()))
    return 0 if explanation.decision.allowed else 2


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
    _admin_args(serve)
    _jwks_listen_args(serve)
    _tls_args(serve)
    decision_log_flags.add_arguments(serve)
    _metrics_args(serve)
    _workers_args(serve)
    serve.set_defaults(func=cmd_serve)
    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    lint_p = policy_sub.add_parser("lint", help="load and validate a policy directory")
    lint_p.add_argument("directory", type=Path)
    lint_p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    lint_p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    lint_p.set_defaults(func=cmd_lint)
    ptest = policy_sub.add_parser(
        "test", help="run the *.test.yaml cases of a policy directory (like opa test)"
    )
    ptest.add_argument("directory", type=Path)
    ptest.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    ptest.add_argument("--run", metavar="REGEX", help="only cases whose name matches")
    ptest.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    ptest.set_defaults(func=cmd_policy_test)
    check = sub.add_parser(
        "check",
        help="decide one described request offline and explain why (exit 0 allow, 2 deny)",
    )
    _serve_args(check)
    check.add_argument("request", type=Path, help="YAML/JSON request description, or -")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="run the local demo mesh (development only)")
    demo.add_argument("--once", action="store_true", help="play the scenario once and exit")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"))
    demo.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a supervisor's workers reuse it
    worker = getattr(args, "worker_index", None)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s"
        + ("" if worker is None else f" [worker {worker}]")
        + ": %(message)s",
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
