"""Every error `farm` raises on purpose, rooted in one class.

    FarmError
     +-- PermanentError          not retried: the input or the set-up is wrong
     |    +-- SpecError          a job spec is invalid; names each field and why
     |    +-- ModelError         a model cannot be found, refused or loaded
     |    +-- StoreAccessDenied  the store refused our credentials
     |    +-- JobNotFound        no job of that id in Redis or the store
     |    +-- BrokerAccessDenied Redis refused our credentials
     |    +-- SettingMissing     a setting the command needs is not set
     +-- RetriableError          retried with backoff: a service blinked
          +-- StoreUnavailable   the object store did not answer
          +-- BrokerUnavailable  Redis did not answer
"""

from __future__ import annotations


class FarmError(Exception):
    """Root of every error raised by farm."""


class PermanentError(FarmError):
    """Retrying cannot help: the item or the job fails with this reason."""


class RetriableError(FarmError):
    """A passing fault: the same work may succeed when tried again."""


class SpecError(PermanentError):
    """A job spec failed validation. Holds every problem found, each as (field, reason)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{field}: {reason}" for field, reason in self.problems))

    @classmethod
    def single(cls, field: str, reason: str) -> "SpecError":
        return cls([(field, reason)])


class ModelError(PermanentError):
    """A model is missing, in a refused format, or fails to load."""


class StoreAccessDenied(PermanentError):
    """The store answered, and refused: wrong credentials or no permission."""


class JobNotFound(PermanentError):
    """No job of this id is known."""


class BrokerAccessDenied(PermanentError):
    """Redis answered, and refused our credentials."""


class SettingMissing(PermanentError):
    """A setting this command needs (the broker, the store) is not set."""


class StoreUnavailable(RetriableError):
    """The store did not answer, or answered with a server error."""


class BrokerUnavailable(RetriableError):
    """Redis did not answer."""
