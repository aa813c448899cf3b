"""``extauthz`` command line: ``serve``, ``check``, ``policy lint|test``; development only:
``demo``, ``certs``, ``token``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, policytest
from .authorizer import Authorizer
from .config import DEFAULT_LISTEN, DEFAULT_MAX_CONCURRENT_CHECKS, Settings
from .decisionlog import settings as decision_log_flags
from .decisionlog.log import DecisionLog
from .devtools import devcli
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
    p.add_argument(
        "--http-listen",
        help="also answer Envoy's ext_authz http_service here: 127.0.0.1:PORT or unix:/path "
        "(loopback only: it trusts the x-extauthz-peer header Envoy sets; several times "
        "faster than gRPC, docs/envoy.md; default: off)",
    )
    p.add_argument(
        "--http-upstream-headers",
        default="x-*,authorization",
        help="the header names Envoy's allowed_upstream_headers lets upstream, prefixes "
        "ending in '*' (default: x-*,authorization, as envoy/sidecar-http.yaml); a header "
        "extauthz sets under another name is removed instead",
    )
    p.add_argument(
        "--http-path-prefix",
        default="",
        help="the path_prefix of Envoy's http_service, removed from the path (default: none)",
    )
    p.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the server's event loop: uvloop (8-12%% less CPU per Check, loadtest/README.md), "
        "asyncio's own, or auto: uvloop when installed (default)",
    )
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


def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-concurrent-checks",
        type=_count,
        default=DEFAULT_MAX_CONCURRENT_CHECKS,
        metavar="N",
        help="Checks decided at once; beyond N, more are answered at once with a 503 deny, "
        f"reason 'overloaded', instead of queueing (0: no limit; default "
        f"{DEFAULT_MAX_CONCURRENT_CHECKS})",
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
        max_concurrent_checks=getattr(args, "max_concurrent_checks", DEFAULT_MAX_CONCURRENT_CHECKS),
        http_listen=getattr(args, "http_listen", None),
        http_path_prefix=getattr(args, "http_path_prefix", ""),
        http_upstream_headers=getattr(args, "http_upstream_headers", "x-*,authorization"),
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
    elif not (policies.authz or policies.authn):
        # As a reload refuses a set that lost every policy: an empty directory (a ConfigMap
        # not yet filled, a wrong mount) would allow everything. Omitting --policies is the
        # explicit way to run with none.
        keys.close()
        raise ConfigError(
            f"--policies {settings.policies}: no AuthorizationPolicy or RequestAuthentication "
            "found, which would allow every request; refusing to start (omit --policies to "
            "run with none on purpose)"
        )
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
        max_concurrent_checks=settings.max_concurrent_checks,
        http_listen=settings.http_listen,
        http_path_prefix=settings.http_path_prefix,
        http_upstream_headers=settings.http_upstream_headers,
    )
    try:
        factory = event_loop_factory(args.event_loop)
        log.info("event loop: %s", "asyncio" if factory is None else "uvloop")
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(server, _ready_signal(args.worker_ready_fd)))
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
                ("http", plan.http_listen),
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


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``--event-loop``: uvloop's loop factory, or None for asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _ready_signal(fd: int | None) -> Callable[[], None] | None:
    """A worker's "serving" message to its supervisor, or None outside a supervisor."""
    if fd is None:
        return None

    def ready() -> None:
        try:
            os.write(fd, READY)
        except BrokenPipeError:
            pass  # the supervisor stopped listening: it is stopping, and so shall we
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

    return demo_main(once=args.once, workdir=args.workdir, base_port=args.base_port)


def _dev_arg(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A devcli validator as an argparse type: its ValueError text becomes the message."""

    def checked(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    checked.__name__ = convert.__name__
    return checked


def _dev_banner(command: str) -> None:
    print(devcli.BANNER.format(command=command), file=sys.stderr)


def cmd_certs(args: argparse.Namespace) -> int:
    _dev_banner("certs")
    try:
        paths = devcli.write_svids(
            args.out,
            args.names,
            domain=args.trust_domain,
            namespace=args.namespace,
            dns_names=args.dns if args.dns is not None else ["localhost"],
        )
    except ValueError as exc:  # names that collide as files ("ca", "x" with "x-key")
        print(f"extauthz certs: error: argument NAME: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"extauthz certs: error: argument --out: {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"CA      {paths['ca']}  (its key is not kept: nothing can issue more from disk)")
    for name in args.names:
        sid = devcli.spiffe_id(args.trust_domain, args.namespace, name)
        print(f"SVID    {paths[name]}  {paths[name + '-key']}  {sid}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    _dev_banner("token")
    if not args.issuer:
        print("extauthz token: error: argument --issuer: must not be empty", file=sys.stderr)
        return 2
    try:
        if args.new_key:
            devcli.create_signing_key(args.key)
        idp = devcli.load_idp(args.key, args.issuer)
    except ConfigError as exc:
        hint = "" if args.new_key or args.key.exists() else " (create one with --new-key)"
        print(f"extauthz token: error: argument --key: {exc.message}{hint}", file=sys.stderr)
        return 2
    if args.jwks is not None:
        try:
            devcli.write_jwks(idp, args.jwks)
        except OSError as exc:
            print(
                f"extauthz token: error: argument --jwks: {args.jwks}: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
    print(
        devcli.sign(
            idp,
            subject=args.subject,
            audiences=args.audience if args.audience is not None else [devcli.DEFAULT_AUDIENCE],
            ttl=args.ttl,
            claims=dict(args.claim),
        )
    )
    return 0


def _base_port(text: str) -> int:
    what = "a port 1-65532 (the demo takes it and the next three)"
    value = int(_number(text, int, 1, what))
    if value > 65532:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


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
    _limit_args(serve)
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
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        help="certificates, tokens, policies, decision log and spans go here (default: .demo)",
    )
    demo.add_argument(
        "--base-port",
        type=_base_port,
        default=devcli.DEMO_BASE_PORT,
        metavar="PORT",
        help=f"extauthz listens on PORT, the frontend, orders and payments sidecars on the "
        f"next three (default: {devcli.DEMO_BASE_PORT})",
    )
    demo.set_defaults(func=cmd_demo)
    _dev_parsers(sub)
    return ap


def _dev_parsers(sub: Any) -> None:
    certs = sub.add_parser(
        "certs",
        help="DEVELOPMENT ONLY: write a throwaway CA and SPIFFE X.509-SVIDs",
        description="DEVELOPMENT ONLY. Writes a fresh self-signed CA (ca.pem; its key is "
        "discarded) and, per NAME, NAME.pem and NAME-key.pem (mode 0600): an X.509-SVID "
        "for spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/NAME, valid for a day.",
    )
    certs.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        type=_dev_arg(devcli.path_segment),
        help="workload (service account) names",
    )
    certs.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    certs.add_argument(
        "--trust-domain",
        type=_dev_arg(devcli.trust_domain),
        default=devcli.DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain (default: {devcli.DEFAULT_TRUST_DOMAIN})",
    )
    certs.add_argument(
        "--namespace",
        type=_dev_arg(devcli.path_segment),
        default=devcli.DEFAULT_NAMESPACE,
        help=f"namespace in the SPIFFE IDs (default: {devcli.DEFAULT_NAMESPACE})",
    )
    certs.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="a DNS SAN for every SVID, repeatable (default: localhost, so curl can verify "
        "a sidecar on 127.0.0.1)",
    )
    certs.set_defaults(func=cmd_certs)

    token = sub.add_parser(
        "token",
        help="DEVELOPMENT ONLY: sign a JWT with chosen claims",
        description="DEVELOPMENT ONLY. Prints an ES256 JWT signed with --key (EC P-256 PEM). "
        "--new-key creates the key, --jwks writes its public JWKS for a RequestAuthentication "
        "(jwksUri: FILE or jwks:). The kid is the key's RFC 7638 thumbprint.",
    )
    token.add_argument("--key", type=Path, required=True, metavar="PEM", help="signing key")
    token.add_argument(
        "--new-key", action="store_true", help="create --key first (never replaces a file)"
    )
    token.add_argument("--jwks", type=Path, metavar="FILE", help="write --key's public JWKS here")
    token.add_argument(
        "--issuer",
        default=devcli.DEFAULT_ISSUER,
        help=f"iss (default: {devcli.DEFAULT_ISSUER}, the demo's)",
    )
    token.add_argument(
        "--audience",
        action="append",
        metavar="AUD",
        help=f"aud, repeatable (default: {devcli.DEFAULT_AUDIENCE})",
    )
    token.add_argument(
        "--subject", default=devcli.DEFAULT_SUBJECT, help=f"sub (default: {devcli.DEFAULT_SUBJECT})"
    )
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        type=_dev_arg(devcli.parse_claim),
        metavar="KEY=VALUE",
        help='another claim, repeatable; VALUE is JSON when it parses (roles=["admin"], '
        "level=3), else a string",
    )
    token.add_argument(
        "--ttl",
        type=_dev_arg(devcli.ttl),
        default=devcli.DEFAULT_TTL,
        metavar="S",
        help=f"seconds until exp; negative: an expired token (default: {devcli.DEFAULT_TTL:g})",
    )
    token.set_defaults(func=cmd_token)


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
