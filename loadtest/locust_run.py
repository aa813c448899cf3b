"""Start extauthz behind a real Envoy, then run ``locust --headless`` against both.

    python -m loadtest.locust_run [--seconds 30] [--users 16] [--user CheckUser,EnvoyUser]
                                  [--workers 1] [--csv PREFIX]

The servers are ``loadtest.bench``'s realistic setup (extauthz with ``--workers`` workers,
the measured Envoy, its mTLS front Envoy), all children of this process on 127.0.0.1.
Prints locust's summary; exits with locust's status (non-zero when any request failed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest import bench

HERE = Path(__file__).resolve().parent
USERS = ("CheckUser", "EnvoyUser")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--users", type=int, default=16, help="concurrent users (default 16)")
    ap.add_argument("--user", default=",".join(USERS), help="comma-separated user classes")
    ap.add_argument("--workers", type=int, default=1, help="extauthz workers (default 1)")
    ap.add_argument("--csv", help="also write locust's CSV stats with this prefix")
    args = ap.parse_args(argv)
    users = [u.strip() for u in args.user.split(",") if u.strip()]
    if not users or any(u not in USERS for u in users):
        ap.error(f"--user: expected some of {', '.join(USERS)}, got {args.user!r}")
    if args.seconds < 1 or args.users < 1 or args.workers < 1:
        ap.error("--seconds, --users and --workers must be >= 1")
    setup = f"extauthz-{args.workers}"
    with tempfile.TemporaryDirectory(prefix="extauthz-locust-") as tmp:
        stack = bench.Stack(Path(tmp))
        try:
            (target,) = bench.start(stack, [setup], ["realistic"], None)
            env = {
                **os.environ,
                "EXTAUTHZ_TARGET": ",".join(stack.authz[f"{setup}/realistic"]),
                "BENCH_PATH": target.request.path,
                "BENCH_HEADERS": json.dumps(dict(target.request.headers)),
            }
            argv_ = [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(HERE / "locustfile.py"),
                "--headless",
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.users),
                "--run-time",
                f"{args.seconds}s",
                "--host",
                f"http://127.0.0.1:{target.port}",
                "--only-summary",
                "--stop-timeout",
                "5",
                *(["--csv", args.csv] if args.csv else []),
                *users,
            ]
            # cwd: the repository root, so that the locustfile imports `loadtest`.
            return subprocess.run(argv_, env=env, cwd=HERE.parent, check=False).returncode
        finally:
            stack.close()


if __name__ == "__main__":
    sys.exit(main())
