"""The one retry policy for every call to a dependency (Milvus, the image store, the embedder, a remote
service), built on tenacity.

Adapters turn their library's failures into typed domain errors (``BackendUnavailable``,
``ConnectionDropped``, ``MilvusLiteLocked``); this policy decides from the type alone:

- ``ConnectionDropped`` is retried at once, even with no time budget: the call never reached the
  dependency or its answer was lost, and every call the product makes is idempotent.
- other ``BackendUnavailable`` errors marked ``transient`` are retried with exponential backoff while
  the budget (``deadline_s``) lasts: the ingest job rides out an outage, the HTTP API (budget 0) answers
  503 at once instead of holding the client.
- anything else (bad input, a model mismatch, a locked Milvus Lite file) is raised at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from tenacity import RetryCallState, Retrying, before_sleep_log

from bento.core.errors import BackendUnavailable, ConnectionDropped

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# A dropped connection is retried this many times however small the budget.
DROPPED_CONNECTION_RETRIES = 1


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a dependency that is unavailable, in seconds (0: fail fast)."""

    deadline_s: float = 0.0
    max_wait_s: float = 10.0

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` under this policy; the last error is raised when it gives up."""
        return Retrying(
            retry=self._should_retry,
            wait=self._wait,
            stop=lambda _: False,  # _should_retry owns the decision (it knows the error's type)
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        )(fn, *args, **kwargs)

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait_s, 0.5 * 2 ** (attempt - 1))

    def _wait(self, state: RetryCallState) -> float:
        dropped = state.outcome is not None and isinstance(state.outcome.exception(), ConnectionDropped)
        return 0.0 if dropped and state.attempt_number <= DROPPED_CONNECTION_RETRIES else self._backoff(state.attempt_number)

    def _should_retry(self, state: RetryCallState) -> bool:
        if state.outcome is None or not state.outcome.failed:
            return False
        error = state.outcome.exception()
        if isinstance(error, ConnectionDropped) and state.attempt_number <= DROPPED_CONNECTION_RETRIES:
            return True
        if not isinstance(error, BackendUnavailable) or not error.transient:
            return False
        return (state.seconds_since_start or 0.0) + self._backoff(state.attempt_number) <= self.deadline_s


FAIL_FAST = RetryPolicy(0.0)
