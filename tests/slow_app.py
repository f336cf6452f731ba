"""An app for `walstate worker --app` that is slow to load: in its import, or in its factory.

``WALSTATE_SLOW_APP=import`` (or ``factory``): that part touches the file named by
``WALSTATE_SLOW_APP_READY`` and then waits until the process is stopped.
"""

from __future__ import annotations

import os
import time

from walstate import Engine


def _hang() -> None:
    open(os.environ["WALSTATE_SLOW_APP_READY"], "w").close()
    while True:
        time.sleep(0.05)


if os.environ.get("WALSTATE_SLOW_APP") == "import":
    _hang()


def make_engine(path: str) -> Engine:
    if os.environ.get("WALSTATE_SLOW_APP") == "factory":
        _hang()
    return Engine(path)
