"""Save a screenshot of `clusterq dash` (SVG) for the README.

Usage: .venv/bin/python scripts/dash-screenshot.py [OUT.svg]  (default docs/dash.svg)
Reads CLUSTERQ_URL (default redis://127.0.0.1:7000): run it after scripts/demo.sh, while
the demo's cluster is up.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from clusterq.ops.admin import Admin
from clusterq.ops.dash import Dashboard


async def main(out: str) -> None:
    admin = Admin(os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000"), timeout=1.0)
    app = Dashboard(admin, interval=0.5)
    async with app.run_test(size=(150, 36)) as pilot:
        deadline = time.monotonic() + 15
        while not app.queue_rows or not app.snapshot.rates:
            if time.monotonic() > deadline:
                raise SystemExit("the dashboard showed no queues")
            await pilot.pause(0.1)
        app.save_screenshot(out)
    admin.close()
    print(f"saved {out}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "docs/dash.svg"))
