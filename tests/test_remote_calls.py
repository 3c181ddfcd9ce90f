"""How the API service calls its inner services at once (bento/adapters/remote.py)."""

from __future__ import annotations


def test_a_full_house_of_searches_still_runs_their_inner_calls():
    """Each search holds a thread of AnyIO's default pool (40) while its two halves run in other worker threads
    (bento.adapters.remote.in_worker_threads). With every default thread held by a waiting search, the halves
    must still start: they draw on a budget of their own (drawn from the same pool, this hangs)."""
    import threading

    import anyio

    from bento.adapters.remote import in_worker_threads

    holders = 40  # AnyIO's default: checked in the loop below
    everyone_waiting = threading.Barrier(holders)

    def search() -> tuple[int, int]:
        everyone_waiting.wait(timeout=30)  # every default thread is now held by a search
        return in_worker_threads(lambda: 1, lambda: 2)

    async def main() -> list[tuple[int, int]]:
        assert anyio.to_thread.current_default_thread_limiter().total_tokens == holders
        results: list[tuple[int, int]] = []

        async def one() -> None:
            results.append(await anyio.to_thread.run_sync(search))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for _ in range(holders):
                    group.start_soon(one)
        return results

    assert anyio.run(main) == [(1, 2)] * holders
