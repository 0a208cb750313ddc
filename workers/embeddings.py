"""Textual-inversion embeddings from the operator's folder (`FARM_EMBEDDINGS_DIR`), used in a
prompt by their file name, as the webui v1.10.1 uses them (`modules/textual_inversion`).

A file is `.safetensors` only (pickles are never loaded): the webui's layout (`emb_params`), a
diffusers concept (one key, the token), or SDXL's (`clip_l` and `clip_g`). An embedding whose
width does not fit a model's text encoder is left out for that model, its name read as words,
as the webui leaves it out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Embedding:
    name: str
    #: Vectors by SDXL key ("clip_l", "clip_g"), or under "" for a one-encoder embedding.
    vectors: dict[str, torch.Tensor]
    #: The webui's short hash: the first 12 hex digits of the file's SHA-256.
    shorthash: str

    def for_encoder(self, key: str, width: int) -> torch.Tensor | None:
        vectors = self.vectors.get(key, self.vectors.get(""))
        return vectors if vectors is not None and vectors.shape[-1] == width else None

    @property
    def length(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def read(path: Path) -> Embedding:
    data = load_file(str(path))
    if "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif len(data) == 1:
        vectors = {"": next(iter(data.values()))}
    else:
        raise ValueError(f"{path.name}: not an embedding (keys {sorted(data)[:4]})")
    vectors = {k: (v.unsqueeze(0) if v.ndim == 1 else v).to(torch.float32) for k, v in vectors.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Embedding(path.stem, vectors, digest[:12])


@dataclass
class EmbeddingLibrary:
    """The embeddings of a folder, read once; `matcher` finds them in one encoder's tokens."""

    folder: Path | None
    _embeddings: list[Embedding] | None = None
    _matchers: dict = field(default_factory=dict)

    @property
    def embeddings(self) -> list[Embedding]:
        if self._embeddings is None:
            self._embeddings = []
            paths = sorted(self.folder.glob("*.safetensors")) if self.folder and self.folder.is_dir() else []
            for path in paths:
                try:
                    self._embeddings.append(read(path))
                except (ValueError, OSError) as e:
                    log.warning("skipped embedding %s: %s", path, e)
        return self._embeddings

    def matcher(self, tokenizer, key: str, width: int) -> "Matcher | None":
        cache_key = (id(tokenizer), key, width)
        if cache_key not in self._matchers:
            usable = [e for e in self.embeddings if e.for_encoder(key, width) is not None]
            self._matchers[cache_key] = Matcher(tokenizer, usable, key) if usable else None
        return self._matchers[cache_key]


class Matcher:
    """Embedding names as token sequences, longest first, by their first token (the webui's
    `ids_lookup`)."""

    def __init__(self, tokenizer, embeddings: list[Embedding], key: str):
        self.key = key
        self.by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in embeddings:
            ids = tokenizer([embedding.name], truncation=False, add_special_tokens=False)["input_ids"][0]
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def at(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name starts at `position`, and how many tokens the name took."""
        for ids, embedding in self.by_first.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return embedding, len(ids)
        return None
