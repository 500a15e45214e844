"""How hard the robustness suite pushes.

The CI versions run with the defaults below as part of the ordinary test command. The
long run (``make robustness``) sets ``NAS_JANITOR_ROBUSTNESS=long``: more examples, more
state-machine runs, more kill points, the full load test and schemathesis against the
real agent on its own lab. ``NAS_JANITOR_ROBUSTNESS_SEED`` fixes the schemathesis and
Hypothesis seed of a run (CI uses a fixed one, the long run a fresh one it prints).
"""

from __future__ import annotations

import os
import random

LONG = os.environ.get("NAS_JANITOR_ROBUSTNESS", "").strip().lower() == "long"


def seed() -> int:
    given = os.environ.get("NAS_JANITOR_ROBUSTNESS_SEED", "").strip()
    if given:
        return int(given)
    return random.SystemRandom().randrange(1, 2**31) if LONG else 20261128


# schemathesis: examples per operation and phase (the contract asks >= 100 in CI)
FUZZ_EXAMPLES = 400 if LONG else 100
# schemathesis against the real agent on a lab of its own (long run only)
LAB_FUZZ_EXAMPLES = 100

# Hypothesis state machine over the fakes
MACHINE_EXAMPLES = 150 if LONG else 20
MACHINE_STEPS = 60 if LONG else 30

# kill -9 at chosen points of an apply: which deletes (1-based) to die on
KILL_ON_DELETE = (1, 2, 4, 7) if LONG else (2,)

# load test on the read endpoints: concurrent clients and seconds
LOAD_CLIENTS = 50 if LONG else 10
LOAD_SECONDS = 30.0 if LONG else 5.0
