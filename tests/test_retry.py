"""The one retry policy (bento/core/retry.py): what it retries is decided by the error's type."""

import pytest

from bento.core import errors
from bento.core.retry import FAIL_FAST, RetryPolicy


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then answers."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self, value: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return value


def test_a_dropped_connection_is_retried_once_even_when_failing_fast():
    once = Flaky(errors.ConnectionDropped("closed under us"), failures=1)
    assert FAIL_FAST.call(once, "ok") == "ok" and once.calls == 2
    twice = Flaky(errors.ConnectionDropped("closed under us"), failures=2)
    with pytest.raises(errors.ConnectionDropped):
        FAIL_FAST.call(twice, "ok")
    assert twice.calls == 2


def test_an_outage_is_not_retried_without_a_budget_and_ridden_out_with_one():
    down = Flaky(errors.BackendUnavailable("Milvus is down"), failures=2)
    with pytest.raises(errors.BackendUnavailable):
        FAIL_FAST.call(down, "ok")
    assert down.calls == 1
    brief = Flaky(errors.BackendUnavailable("Milvus is down"), failures=2)
    assert RetryPolicy(deadline_s=5.0, max_wait_s=0.05).call(brief, "ok") == "ok" and brief.calls == 3


def test_the_budget_bounds_the_waiting():
    forever = Flaky(errors.BackendUnavailable("Milvus is down"), failures=10**6)
    with pytest.raises(errors.BackendUnavailable):
        RetryPolicy(deadline_s=0.3, max_wait_s=0.05).call(forever, "ok")
    assert 2 <= forever.calls <= 12


@pytest.mark.parametrize(
    "error",
    [errors.MilvusLiteLocked("held by another process"), errors.InvalidImage("truncated"), errors.ModelMismatch("x"), ValueError("a bug")],
)
def test_what_waiting_cannot_fix_is_raised_at_once(error):
    failing = Flaky(error, failures=1)
    with pytest.raises(type(error)):
        RetryPolicy(deadline_s=60.0).call(failing, "ok")
    assert failing.calls == 1
