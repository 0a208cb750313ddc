"""Prompt conditioning as the webui v1.10.1 computes it (`modules/sd_hijack_clip.py`,
`modules/sd_emphasis.py`), for SD1 and SD2 text encoders.

A prompt is read into weighted pieces (`farm.prompts`), tokenized piece by piece, and cut
into chunks of `model_max_length - 2` tokens (75 for every real model): at a BREAK, or when a
chunk is full, moving the words after the chunk's last comma into the next chunk when that
comma is within 20 tokens of the end. Each chunk is encoded on its own with its start and end
tokens, its token embeddings multiplied by their weights (then, with "Original" emphasis, scaled
back to the chunk's mean), and the chunks are concatenated. The prompt and its negative are
padded to the same number of chunks with the empty prompt's chunk (the webui's "pad prompt and
negative prompt to be same length"). Prompt editing switches the conditioning between model
evaluations, counted as the webui counts them.

"Clip skip" takes the output of the N-th layer from the end through the final layer norm, as
the webui does (diffusers 0.42's own clip_skip path reaches for `text_encoder.text_model`,
which transformers 5 removed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from farm.prompts import BREAK_WEIGHT, Emphasis, pieces, schedules

#: The webui's "comma_padding_backtrack": how far back a full chunk looks for a comma to cut at.
COMMA_BACKTRACK = 20


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class Conditioner:
    """A pipeline's tokenizer and text encoder, used as the webui uses them."""

    def __init__(self, pipe, clip_skip: int = 1, emphasis: Emphasis = "Original"):
        self.tokenizer, self.encoder = pipe.tokenizer, pipe.text_encoder
        self.device, self.clip_skip, self.emphasis = pipe.device, clip_skip, emphasis
        self.length = self.tokenizer.model_max_length - 2
        self.start, self.end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        # SD1 pads with its end token; SD2 pads what follows the first end token with "!" (id 0).
        pad = self.tokenizer.pad_token_id
        self.pad = self.end if pad is None else pad
        self.comma = self.tokenizer.get_vocab().get(",</w>")

    def chunks(self, text: str) -> list[_Chunk]:
        """The prompt's chunks, each `length + 2` tokens with their weights."""
        parsed = pieces(text, self.emphasis)
        token_lists = self.tokenizer([piece for piece, _ in parsed], truncation=False,
                                     add_special_tokens=False)["input_ids"]
        chunks: list[_Chunk] = []
        chunk, last_comma = _Chunk(), -1

        def close() -> None:
            nonlocal chunk, last_comma
            fill = self.length - len(chunk.tokens)
            chunk.tokens = [self.start, *chunk.tokens, *[self.end] * fill, self.end]
            chunk.weights = [1.0, *chunk.weights, *[1.0] * (fill + 1)]
            chunks.append(chunk)
            chunk, last_comma = _Chunk(), -1

        for tokens, (piece, weight) in zip(token_lists, parsed):
            if piece == "BREAK" and weight == BREAK_WEIGHT:
                close()
                continue
            for token in tokens:
                if token == self.comma:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == self.length and last_comma != -1 \
                        and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved = _Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                    del chunk.tokens[cut:], chunk.weights[cut:]
                    close()
                    chunk = moved
                if len(chunk.tokens) == self.length:
                    close()
                chunk.tokens.append(token)
                chunk.weights.append(weight)
        if chunk.tokens or not chunks:
            close()
        return chunks

    def chunk_count(self, text: str) -> int:
        return len(self.chunks(text))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """The conditioning of texts encoded together (emphasis restores the mean over all of
        them, chunk by chunk), shape (len(texts), chunks * (length + 2), width)."""
        per_text = [self.chunks(text) for text in texts]
        count = max(len(chunks) for chunks in per_text)
        encoded = [self._encode([chunks[i] if i < len(chunks) else self._empty() for chunks in per_text])
                   for i in range(count)]
        return torch.hstack(encoded).to(dtype=self.encoder.dtype)

    def _empty(self) -> _Chunk:
        return _Chunk([self.start, *[self.end] * (self.length + 1)], [1.0] * (self.length + 2))

    def _encode(self, batch: list[_Chunk]) -> torch.Tensor:
        tokens = torch.tensor([chunk.tokens for chunk in batch], device=self.device)
        if self.pad != self.end:
            for row, chunk in enumerate(batch):
                tokens[row, chunk.tokens.index(self.end) + 1:] = self.pad
        z = self.hidden_states(tokens)
        if self.emphasis == "None":
            return z
        weights = torch.tensor([chunk.weights for chunk in batch], device=self.device)
        original_mean = z.mean()
        z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
        if self.emphasis == "Original":
            z = z * (original_mean / z.mean())
        return z

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text encoder's output for a token batch, `clip_skip` layers from the end."""
        out = self.encoder(tokens, output_hidden_states=True)
        final_norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm
        return final_norm(out.hidden_states[-self.clip_skip])


def pad_to(conditioning: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """`conditioning` made `chunks` chunks long with copies of the empty prompt's chunk."""
    missing = chunks - conditioning.shape[1] // empty.shape[1]
    if missing <= 0:
        return conditioning
    return torch.cat([conditioning, empty.repeat(conditioning.shape[0], missing, 1)], dim=1)


#: A prompt's conditioning over sampling: (last evaluation, conditioning of shape (1, L, width)).
Scheduled = list[tuple[int, torch.Tensor]]


class PromptSchedule:
    """A batch's conditioning at each model evaluation, switched as the webui switches it for
    prompt editing and alternation. Each prompt is encoded on its own, its schedule's texts
    together (as the webui encodes them), so an image's conditioning never depends on the rest of
    its batch; the batch's prompts must come to the same number of chunks (`render` splits a
    batch where they do not)."""

    def __init__(self, pipe, prompts: Sequence[str], negatives: Sequence[str], steps: int, *,
                 hires_steps: int | None = None, clip_skip: int = 1, emphasis: Emphasis = "Original"):
        conditioner = Conditioner(pipe, clip_skip, emphasis)
        self.positive = [self._encoded(conditioner, text, steps, hires_steps) for text in prompts]
        self.negative = [self._encoded(conditioner, text, steps, hires_steps) for text in negatives]
        self.empty = conditioner([""])

    @staticmethod
    def _encoded(conditioner: Conditioner, prompt: str, steps: int, hires_steps: int | None) -> Scheduled:
        entries = schedules(prompt, steps, hires_steps)
        encoded = conditioner([text for _, text in entries])
        return [(end, encoded[i:i + 1]) for i, (end, _) in enumerate(entries)]

    @property
    def changes(self) -> bool:
        return any(len(s) > 1 for s in self.positive + self.negative)

    def at(self, evaluation: int) -> dict:
        """`prompt_embeds` and `negative_prompt_embeds` for the evaluation (counted from 0)."""
        chunk = self.empty.shape[1]
        positive, negative = [], []
        for p, n in zip(self.positive, self.negative):
            p, n = _current(p, evaluation), _current(n, evaluation)
            longest = max(p.shape[1], n.shape[1]) // chunk
            positive.append(pad_to(p, longest, self.empty))
            negative.append(pad_to(n, longest, self.empty))
        return {"prompt_embeds": torch.cat(positive), "negative_prompt_embeds": torch.cat(negative)}

    def switching(self, on_step=None):
        """A `callback_on_step_end` that hands the pipeline the next evaluation's conditioning
        (after running `on_step`, the progress and cancel check)."""
        def step(pipe, index: int, timestep, kwargs: dict) -> dict:
            kwargs = on_step(pipe, index, timestep, kwargs) if on_step is not None else kwargs
            text = self.at(index + 1)
            embeds = text["prompt_embeds"]
            if pipe.do_classifier_free_guidance:
                embeds = torch.cat([text["negative_prompt_embeds"], embeds])
            return {**kwargs, "prompt_embeds": embeds.to(kwargs["prompt_embeds"].dtype)}

        return step


def _current(scheduled: Scheduled, evaluation: int) -> torch.Tensor:
    # The first entry that lasts to this evaluation; past the last, the first (as the webui does).
    for end, conditioning in scheduled:
        if evaluation <= end:
            return conditioning
    return scheduled[0][1]


def length_in_chunks(pipe, texts: Sequence[str], emphasis: Emphasis = "Original") -> int:
    """How many chunks the longest of these texts encodes to."""
    conditioner = Conditioner(pipe, emphasis=emphasis)
    return max(conditioner.chunk_count(text) for text in texts)
