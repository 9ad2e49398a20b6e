"""Settings shared by the property-based fuzz suites (``tests/fuzz/``).

CI runs ``FUZZ_EXAMPLES`` generated inputs per reader (2,000 by default, derandomised so a CI
failure reproduces); the nightly profile is ``DELTATUNE_FUZZ_EXAMPLES=50000 make fuzz``.
Every fuzz test wraps its body in ``counted(name)`` so the suite can report how many inputs
each reader saw and that none ended in an unexpected exception (``tests/fuzz/conftest.py``
prints the table at the end of the session).
"""

from __future__ import annotations

import collections
import contextlib
import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "2000"))
NIGHTLY = FUZZ_EXAMPLES > 2000

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not NIGHTLY, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)

# reader -> Counter of outcomes ("ok", "DeltatuneError", ...); filled by ``counted``
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


class Outcome:
    """What one generated input led to; the body of ``counted`` may name it (``outcome.name``)."""

    def __init__(self) -> None:
        self.name = "ok"


@contextlib.contextmanager
def counted(reader: str):
    """Count one generated input for ``reader``: a clean exit is counted under ``outcome.name``
    ("ok" unless the body set it), a deltatune error by its class name; any other exception is
    counted as "unexpected" and re-raised, so hypothesis shrinks and reports it."""
    from deltatune.core.errors import DeltatuneError
    outcome = Outcome()
    try:
        yield outcome
    except DeltatuneError as e:
        OUTCOMES[reader][type(e).__name__] += 1
    except BaseException:
        OUTCOMES[reader]["unexpected"] += 1
        raise
    else:
        OUTCOMES[reader][outcome.name] += 1
