"""Fault injection for the tests of resume and rollback (the config's ``debug`` section).

Nothing here runs on a normal run: ``inject`` returns the batch stream unchanged unless a
``debug`` key is set, and then wraps it so that the batch of a chosen step

* ``debug.fail_at_step``: makes one worker raise (rank 1, or 0 alone), once, on a fresh run;
* ``debug.nan_at_step``: comes out as NaN, once per run (not again after the rollback it causes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from w2svd.config import DebugConfig


class InjectedFailure(RuntimeError):
    """The fault test's worker failure (``debug.fail_at_step``)."""


def inject(batches: Iterator, debug: DebugConfig, *, step: Callable[[], int], rank: int, world: int,
           resumed: bool, rollbacks: int) -> Iterator:
    """``batches`` itself, or a stream that carries the configured faults."""
    fail = debug.fail_at_step >= 0 and not resumed and rank == min(1, world - 1)
    poison = debug.nan_at_step >= 0 and rollbacks == 0
    if not (fail or poison):
        return batches

    def faulty():
        for batch in batches:
            if fail and step() == debug.fail_at_step:
                raise InjectedFailure(f"injected worker failure at step {step()} (debug.fail_at_step)")
            if poison and step() == debug.nan_at_step:
                batch.x = batch.x * float("nan")
            yield batch

    return faulty()
