"""Errors of confidential training (``models.training``).

All are :class:`models.errors.ModelError` (so the CLI's safety net prints them as one line) and
carry their place in the run: a member lost mid-step is not the same failure as a ring that
cannot form, nor as a refused baseline.
"""

from __future__ import annotations

from models.errors import ModelError

__all__ = [
    "TrainingError",
    "MemberLost",
    "RingProtocolError",
    "TooFewWorkers",
    "UnprotectedRefused",
    "CheckpointError",
    "RunAborted",
]


class TrainingError(ModelError):
    """Root of the training errors."""


class MemberLost(TrainingError):
    """A ring member stopped answering, closed its link or failed its authentication mid-step:
    the step is aborted (nothing of it is applied) and the run resumes from the last sealed
    checkpoint with the remaining members, or stops (:class:`TooFewWorkers`)."""


class RingProtocolError(TrainingError):
    """A ring neighbour sent a header for another round or another gradient size (a worker
    out of step, or a plan that differs between members)."""


class TooFewWorkers(TrainingError):
    """Fewer members remain than the run needs."""


class UnprotectedRefused(TrainingError):
    """The unprotected baseline (plaintext data and links) was asked of an image that does not
    allow it: only the benchmark's own image does (its measured config says so)."""


class CheckpointError(TrainingError):
    """A checkpoint could not be read: malformed, for another plan, or refused by its seal."""


class RunAborted(TrainingError):
    """The host's coordinator aborted the run this worker was in (another member failed or
    ended): the worker drops the run, nothing of the step in progress is applied."""
