"""The render task's message: one chunk's items, its store and its fair-share charge, as JSON.

The wire form is the task's keyword arguments (`job`, `store`, `chunk`, `items`, and
`lane`, `user`, `charge` when the feeder charged it): parameters and store keys,
never images. Decoding checks it, so a malformed message fails with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm import keys
from farm.errors import PermanentError
from farm.fairshare import Charge
from farm.plan import Chunk, Item


class BadMessage(PermanentError):
    """A render message that is not one the feeder sends."""


@dataclass(frozen=True)
class RenderMessage:
    chunk: Chunk
    store: str
    charge: Charge | None = None

    def to_kwargs(self) -> dict:
        kwargs = {"job": self.chunk.job_id, "store": self.store, "chunk": self.chunk.number,
                  "items": [item.to_dict() for item in self.chunk.items]}
        if self.charge is not None:
            kwargs.update(self.charge.to_dict())
        return kwargs

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "RenderMessage":
        try:
            job_id = keys.check_job_id(str(kwargs["job"]))
            items = tuple(Item.from_dict(d) for d in kwargs["items"])
            return cls(Chunk(job_id, int(kwargs["chunk"]), items), str(kwargs["store"]), Charge.from_dict(kwargs))
        except (KeyError, TypeError, ValueError) as e:
            raise BadMessage(f"not a render message: {type(e).__name__}: {e}") from e

