"""``extauthz`` on uvloop, for measuring it (``python -m loadtest.uvloop_serve serve ...``).

extauthz itself runs on asyncio's default loop; this only installs uvloop's event-loop policy
first, so ``asyncio.run`` in the CLI runs on uvloop (grpc.aio uses whatever loop it runs on).
"""

from __future__ import annotations

import sys

import uvloop

from extauthz.cli import main

if __name__ == "__main__":
    uvloop.install()
    sys.exit(main())
