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


class CheckpointError(InvalidInput):
    """A checkpoint's weights, sidecar or architecture disagree: refused, never guessed at."""
