"""Lance commits that survive what object stores do: concurrent writers and dropped connections.

Kept apart from `pipeline.commit` (the committer) so every stage that commits to a Lance dataset (the
committer, the duplicate-id index, the id index) uses the same two rules without importing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import lance
from lance.commit import CommitConflictError

T = TypeVar("T")
CONFLICT_RETRIES = 10
COMMIT_IO_RETRIES = 5  # a commit whose manifest PUT failed in transit (see `commit_once`)


def retry_conflicts(attempt: Callable[[], T]) -> T:
    """`attempt()` until no concurrent commit conflicts with it (each attempt re-reads what it builds on)."""
    for n in range(CONFLICT_RETRIES):
        try:
            return attempt()
        except CommitConflictError:
            if n == CONFLICT_RETRIES - 1:
                raise
            time.sleep(0.05 * 2**n)
    raise AssertionError("unreachable")


def commit_once(uri: str, tx: lance.Transaction, storage_options: dict[str, str], *,
                detached: bool = False) -> lance.LanceDataset:
    """`LanceDataset.commit` that survives a dropped connection on its conditional manifest PUT.

    Lance's object-store client cannot retry that PUT (it cannot know whether it landed), so a
    reset fails the commit. Here the versions after `tx.read_version` are searched for `tx`'s uuid:
    found, the commit landed; not found, it is committed again (a concurrent commit in between is
    Lance's to rebase or refuse). A detached commit that landed unseen is only an orphan manifest.
    """
    for attempt in range(COMMIT_IO_RETRIES):
        try:
            return lance.LanceDataset.commit(uri, tx, storage_options=storage_options, detached=detached)
        except CommitConflictError:
            raise
        except OSError:
            if attempt == COMMIT_IO_RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
            landed = None if detached else _landed(uri, tx, storage_options)
            if landed is not None:
                return landed
    raise AssertionError("unreachable")


def open_existing(uri: str, storage_options: Mapping[str, str], version: int | None = None) -> lance.LanceDataset | None:
    """The dataset at `uri`, or None when there is none (any other failure is raised)."""
    try:
        return lance.dataset(uri, version=version, storage_options=dict(storage_options))
    except FileNotFoundError:
        return None
    except ValueError as e:
        # pylance 14 reports a missing dataset as ValueError("Dataset at path ... was not found: ...").
        if "not found" in str(e).lower():
            return None
        raise


def _landed(uri: str, tx: lance.Transaction, storage_options: dict[str, str]) -> lance.LanceDataset | None:
    """The version `tx` made, if it made one (a dataset's first commit may not have landed at all)."""
    latest = open_existing(uri, storage_options)
    if latest is None:
        return None
    for v in range(tx.read_version + 1, latest.version + 1):
        made = latest.read_transaction(v)
        if made is not None and made.uuid == tx.uuid:
            return lance.dataset(uri, version=v, storage_options=storage_options)
    return None


def retry_io(action: Callable[[], T], done: Callable[[], bool]) -> T | None:
    """`action()` (a Lance call that commits on its own, like an index build or a create) again after an
    I/O error, unless `done()` says it happened anyway (see `commit_once`): then None."""
    for attempt in range(COMMIT_IO_RETRIES):
        try:
            return action()
        except CommitConflictError:
            raise
        except OSError:
            if done():
                return None
            if attempt == COMMIT_IO_RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")
