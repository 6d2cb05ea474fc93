"""The timm integration's tests: run in the timm environment only (`.ci/run`'s second step).

They live outside ``tests/`` (pyproject's ``testpaths``) so that the main environment, which has
no timm, neither collects them nor counts them as skipped. ``tests/`` joins ``sys.path`` for its
``helpers`` module (``run_on_ranks``); spawned ranks inherit it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
