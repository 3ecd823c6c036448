"""The project's error hierarchy: a leaf module importable from every layer, pure ones included.

HTTP codes are chosen only in `services.api`, retry/fail decisions only in `workers`; everything
below raises these types and lets the edges map them.
"""


class FocalloopError(Exception):
    """Base of every error focalloop raises on purpose."""


class InvalidInput(FocalloopError, ValueError):  # noqa: N818 (the design's name)
    """The caller's input is wrong; nothing was changed. Retrying the same input fails again."""


class TransientError(FocalloopError):
    """A temporary failure (a service unreachable, a lease lost): a later retry may succeed."""


class PermanentError(FocalloopError):
    """The work cannot succeed as specified; a cycle that hits it fails with this reason."""


class NonFiniteLossError(PermanentError):
    """Training produced a NaN or infinite loss; the model being trained is discarded."""

    def __init__(self, *, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"training loss became non-finite ({value}) at epoch {epoch}, step {step}; "
            "the previous model stays current (lower the learning rate or gamma)"
        )
        self.epoch = epoch
        self.step = step
        self.value = value


class DeviceUnavailable(PermanentError):  # noqa: N818 (reads as "the device is unavailable")
    """The configured device (FOCALLOOP_DEVICE) does not exist on this machine: training and
    scoring refuse at once rather than silently running somewhere else."""


class CheckpointError(InvalidInput):
    """A checkpoint's weights, sidecar or architecture disagree: refused, never guessed at."""


class NotFound(FocalloopError):  # noqa: N818 (reads as "project not found")
    """The named project, item, version or object does not exist."""


class Conflict(FocalloopError):  # noqa: N818
    """The request contradicts what is already stored (a taken name, a write-once object that
    exists with other content, a state that moved on); nothing was changed."""


class IllegalTransition(Conflict):
    """A status change the state machine does not allow; the row keeps its current status."""

    def __init__(self, *, kind: str, row_id: int, current: str, requested: str) -> None:
        super().__init__(
            f"{kind} {row_id}: illegal transition {current} -> {requested}; "
            f"the {kind} stays {current}"
        )
        self.current = current
        self.requested = requested


class CorruptData(PermanentError):  # noqa: N818
    """Stored bytes do not match the hash recorded for them: refused, never used."""
