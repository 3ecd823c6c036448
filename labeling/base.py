"""The labeler seam: who answers a project's hand-offs, behind one protocol.

A labeler takes a cycle's selected items to people (or to a simulation of them), turns the
answers that come back as inbox events into annotations, reconciles with its tool on beat's
interval, says whether and how labeled items go back for a label-noise review, and checks that
its tool can be reached. `labeling.registry` maps each `Project.labeler["kind"]` and each inbox
event source to an implementation; adding a labeler is a package of its own plus one line there.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import sqlalchemy as sa

from services.config import Settings
from services.errors import PermanentError
from services.models import Project


@dataclass(frozen=True)
class IngestReport:
    """What applying inbox events did: answers stored, duplicates skipped, events refused."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0

    def __add__(self, other: "IngestReport") -> "IngestReport":
        return IngestReport(
            self.stored + other.stored,
            self.duplicates + other.duplicates,
            self.rejected + other.rejected,
        )


@dataclass(frozen=True)
class ReviewPolicy:
    """Labeled items whose label a cross-fitted model gives a probability below `threshold` go
    back to people, at most `per_cycle` per cycle (once per item)."""

    threshold: float
    per_cycle: int


class HandOffRefused(PermanentError):  # noqa: N818 (reads as "the hand-off was refused")
    """The labeler refused a hand-off for good (a missing token, a deleted project): the cycle
    fails with the reason and its selection goes back to the pool."""


class Labeler(Protocol):
    """Who answers a project's hand-offs. Every method is safe to repeat (messages are
    delivered at least once)."""

    source: ClassVar[str]  # InboxEvent.source of the answers it stores
    # People answer after the hand-off, from a queue of open tasks that must not run dry: the
    # trigger refills it (`refill_below`) and ingesting answers asks for the next cycle at once.
    # False for a labeler that answers within the hand-off or never.
    answers_later: ClassVar[bool]

    def hand_off(self, engine: sa.Engine, cycle_id: int, settings: Settings) -> list[int]:
        """Give the cycle's selected items to people; returns the ids of inbox events it stored
        at once (answers to ingest now), usually none. HandOffRefused when it cannot."""
        ...

    def ingest(self, engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
        """Apply its stored inbox events (these ids, or every one still pending)."""
        ...

    def reconcile(self, engine: sa.Engine, project_name: str, settings: Settings) -> None:
        """Catch up with the tool (what a lost message or webhook missed); beat calls it."""
        ...

    def review_policy(self, project: Project) -> ReviewPolicy | None:
        """How labeled items go back for review; None: they do not."""
        ...

    def check(self, project: Project, settings: Settings) -> bool:
        """Whether there is a tool to reach (True once reached); raises a FocalloopError naming
        the problem when it cannot be reached."""
        ...


class NoLabeler:
    """kind "none": the batch stays selected for whoever fetches it (CLI, API)."""

    source: ClassVar[str] = "none"
    answers_later: ClassVar[bool] = False

    def hand_off(self, engine: sa.Engine, cycle_id: int, settings: Settings) -> list[int]:
        return []

    def ingest(self, engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
        return IngestReport()

    def reconcile(self, engine: sa.Engine, project_name: str, settings: Settings) -> None:
        return None

    def review_policy(self, project: Project) -> ReviewPolicy | None:
        return None

    def check(self, project: Project, settings: Settings) -> bool:
        return False
