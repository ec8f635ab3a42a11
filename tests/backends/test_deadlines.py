"""SharedDeadlines: rounded up, never early, at most one step late, in order, and one
object for the memberships made within a step."""

from __future__ import annotations

from backends.deadlines import MAX_STEP_S, STEPS_PER_EXPIRY, SharedDeadlines

DAY_S = 86_400.0


def test_deadlines_within_a_step_are_one_object() -> None:
    deadlines = SharedDeadlines()
    first = deadlines.after(1000.01, DAY_S)
    second = deadlines.after(1000.02, DAY_S)
    assert first is second
    assert deadlines.after(1001.5, DAY_S) is not first


def test_a_deadline_is_never_early_and_at_most_one_step_late() -> None:
    deadlines = SharedDeadlines()
    for expiry in (0.05, 1.0, 30.0, DAY_S):
        step = min(MAX_STEP_S, expiry / STEPS_PER_EXPIRY)
        for now in (0.0, 0.013, 12.345, 99_999.9):
            deadline = deadlines.after(now, expiry)
            assert now + expiry <= deadline <= now + expiry + step


def test_deadlines_keep_the_order_of_their_adds() -> None:
    deadlines = SharedDeadlines()
    made = [deadlines.after(t / 1000, 0.5) for t in range(2000)]
    assert made == sorted(made)


def test_no_expiry_is_not_put_off() -> None:
    assert SharedDeadlines().after(5.0, 0.0) == 5.0
