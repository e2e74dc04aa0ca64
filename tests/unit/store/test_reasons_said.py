"""`ReasonsSaid`: a lasting condition is news once per reason, again after it ended or
changed, and the memory stays bounded."""

from __future__ import annotations

from keeper_state_store.handlers.reasons_said import ReasonsSaid


def test_a_reason_is_news_once_until_it_changes_or_ends() -> None:
    said = ReasonsSaid()

    assert said.is_news("vm-a", "encrypted, no secret")
    assert not said.is_news("vm-a", "encrypted, no secret")
    assert said.is_news("vm-a", "not swtpm's format")
    said.forget("vm-a")
    assert said.is_news("vm-a", "not swtpm's format")


def test_keys_are_independent_and_none_is_a_reason_too() -> None:
    said = ReasonsSaid()

    assert said.is_news("vm-a", None)
    assert said.is_news("vm-b", None)
    assert not said.is_news("vm-a", None)


def test_the_least_recent_key_is_forgotten_beyond_capacity() -> None:
    said = ReasonsSaid(capacity=2)
    said.is_news("vm-a", "x")
    said.is_news("vm-b", "x")
    said.is_news("vm-a", "x")  # vm-a is now the most recent
    said.is_news("vm-c", "x")  # vm-b goes

    assert not said.is_news("vm-a", "x")
    assert said.is_news("vm-b", "x")
