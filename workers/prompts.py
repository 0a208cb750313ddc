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

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from farm.prompts import BREAK_WEIGHT, Emphasis, pieces, schedules
from workers.embeddings import Embedding, EmbeddingLibrary

#: The webui's "comma_padding_backtrack": how far back a full chunk looks for a comma to cut at.
COMMA_BACKTRACK = 20


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    #: Embeddings to write over the token embeddings: (offset after the start token, embedding).
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


class Conditioner:
    """A pipeline's tokenizer and text encoder, used as the webui uses them. `second` takes
    SDXL's second pair; `xl` takes the penultimate layer as it is, as SDXL's conditioner does
    (the webui ignores Clip skip there by default), and keeps the pooled output."""

    def __init__(self, pipe, clip_skip: int = 1, emphasis: Emphasis = "Original", *, second: bool = False,
                 xl: bool = False, embeddings: EmbeddingLibrary | None = None):
        self.tokenizer = pipe.tokenizer_2 if second else pipe.tokenizer
        self.encoder = pipe.text_encoder_2 if second else pipe.text_encoder
        self.device, self.clip_skip, self.emphasis, self.xl = pipe.device, clip_skip, emphasis, xl
        width = self.encoder.get_input_embeddings().embedding_dim
        key = ("clip_g" if second else "clip_l") if xl else ""
        self.matcher = embeddings.matcher(self.tokenizer, key, width) if embeddings else None
        #: The embeddings the prompts read so far used, in order.
        self.used: list[Embedding] = []
        self.length = self.tokenizer.model_max_length - 2
        self.start, self.end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        # SD1 pads with its end token; SD2 pads what follows the first end token with "!" (id 0).
        pad = self.tokenizer.pad_token_id
        self.pad = self.end if pad is None else pad
        # One lookup, not get_vocab(): that copies the whole vocabulary (25 ms for CLIP's) each call.
        comma = self.tokenizer.convert_tokens_to_ids(",</w>")
        self.comma = None if comma == self.tokenizer.unk_token_id else comma

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
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == self.length and last_comma != -1 \
                        and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                    # The webui moves the tokens, not the embeddings among them: so does farm.
                    cut = last_comma + 1
                    moved = _Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                    del chunk.tokens[cut:], chunk.weights[cut:]
                    close()
                    chunk = moved
                if len(chunk.tokens) == self.length:
                    close()
                found = self.matcher.at(tokens, position) if self.matcher else None
                if found is None:
                    chunk.tokens.append(token)
                    chunk.weights.append(weight)
                    position += 1
                    continue
                embedding, name_length = found
                if len(chunk.tokens) + embedding.length > self.length:
                    close()
                chunk.fixes.append((len(chunk.tokens), embedding))
                chunk.tokens += [0] * embedding.length
                chunk.weights += [weight] * embedding.length
                self.used.append(embedding)
                position += name_length
        if chunk.tokens or not chunks:
            close()
        return chunks

    def chunk_count(self, text: str) -> int:
        return len(self.chunks(text))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """The conditioning of texts encoded together (emphasis restores the mean over all of
        them, chunk by chunk), shape (len(texts), chunks * (length + 2), width)."""
        return self.encode(texts)[0]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning, and the pooled output of the first chunk (an encoder with a
        projection, SDXL's second) or None."""
        per_text = [self.chunks(text) for text in texts]
        count = max(len(chunks) for chunks in per_text)
        encoded = [self._encode([chunks[i] if i < len(chunks) else self._empty() for chunks in per_text])
                   for i in range(count)]
        pooled = encoded[0][1]
        return (torch.hstack([z for z, _ in encoded]).to(dtype=self.encoder.dtype),
                None if pooled is None else pooled.to(dtype=self.encoder.dtype))

    def _empty(self) -> _Chunk:
        return _Chunk([self.start, *[self.end] * (self.length + 1)], [1.0] * (self.length + 2))

    def _encode(self, batch: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = torch.tensor([chunk.tokens for chunk in batch], device=self.device)
        if self.pad != self.end:
            for row, chunk in enumerate(batch):
                tokens[row, chunk.tokens.index(self.end) + 1:] = self.pad
        with self._embeddings_written([chunk.fixes for chunk in batch]):
            z, pooled = self.hidden_states(tokens)
        if self.emphasis == "None" or all(w == 1.0 for chunk in batch for w in chunk.weights):
            # Weights of 1 change nothing; skipping them keeps a zero-mean output from becoming 0/0.
            return z, pooled
        weights = torch.tensor([chunk.weights for chunk in batch], device=self.device)
        original_mean = z.mean()
        z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
        if self.emphasis == "Original":
            z = z * (original_mean / z.mean())
        return z, pooled

    @contextmanager
    def _embeddings_written(self, fixes: list[list[tuple[int, Embedding]]]):
        """Token embeddings with each chunk's embeddings written over its placeholder tokens."""
        if not any(fixes):
            yield
            return
        layer = self.encoder.get_input_embeddings()
        key = self.matcher.key

        def write(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            rows = []
            for row, row_fixes in zip(output, fixes):
                for offset, embedding in row_fixes:
                    vectors = embedding.for_encoder(key, layer.embedding_dim).to(row)
                    size = min(row.shape[0] - offset - 1, vectors.shape[0])
                    row = torch.cat([row[:offset + 1], vectors[:size], row[offset + 1 + size:]])
                rows.append(row)
            return torch.stack(rows)

        handle = layer.register_forward_hook(write)
        try:
            yield
        finally:
            handle.remove()

    def hidden_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoder's output for a token batch: `clip_skip` layers from the end through
        the final norm (SDXL: the penultimate layer as it is), and its pooled output if it has one."""
        out = self.encoder(tokens, output_hidden_states=True)
        pooled = getattr(out, "text_embeds", None)
        if self.xl:
            return out.hidden_states[-2], pooled
        final_norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm
        return final_norm(out.hidden_states[-self.clip_skip]), pooled


class ConditionerXL:
    """SDXL's two encoders as the webui's SDXL conditioner uses them: each reads the prompt into
    its own chunks with its own emphasis, their outputs are joined token by token, and the pooled
    output is the second encoder's for the first chunk."""

    def __init__(self, pipe, emphasis: Emphasis = "Original", embeddings: EmbeddingLibrary | None = None):
        self.first = Conditioner(pipe, emphasis=emphasis, xl=True, embeddings=embeddings)
        self.second = Conditioner(pipe, emphasis=emphasis, second=True, xl=True, embeddings=embeddings)

    @property
    def used(self) -> list[Embedding]:
        return self.first.used + self.second.used

    def chunk_count(self, text: str) -> int:
        return max(self.first.chunk_count(text), self.second.chunk_count(text))

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        first, _ = self.first.encode(texts)
        second, pooled = self.second.encode(texts)
        return torch.cat([first, second], dim=-1), pooled


def pad_to(conditioning: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """`conditioning` made `chunks` chunks long with copies of the empty prompt's chunk."""
    missing = chunks - conditioning.shape[1] // empty.shape[1]
    if missing <= 0:
        return conditioning
    return torch.cat([conditioning, empty.repeat(conditioning.shape[0], missing, 1)], dim=1)


#: A prompt's conditioning over sampling: (last evaluation, conditioning of shape (1, L, width),
#: pooled output of shape (1, width) or None).
Scheduled = list[tuple[int, torch.Tensor, torch.Tensor | None]]


class PromptSchedule:
    """A batch's conditioning at each model evaluation, switched as the webui switches it for
    prompt editing and alternation. Each prompt is encoded on its own, its schedule's texts
    together (as the webui encodes them), so an image's conditioning never depends on the rest of
    its batch; the batch's prompts must come to the same number of chunks (`render` splits a
    batch where they do not). On SDXL an empty negative prompt is zeros, as the webui has it."""

    def __init__(self, pipe, prompts: Sequence[str], negatives: Sequence[str], steps: int, *,
                 hires_steps: int | None = None, clip_skip: int = 1, emphasis: Emphasis = "Original",
                 xl: bool = False, embeddings: EmbeddingLibrary | None = None):
        conditioner = ConditionerXL(pipe, emphasis, embeddings) if xl else \
            Conditioner(pipe, clip_skip, emphasis, embeddings=embeddings)
        self.xl = xl
        self.positive, self.negative, self.used = [], [], []
        for prompt, negative in zip(prompts, negatives):
            before = len(conditioner.used)
            self.positive.append(self._encoded(conditioner, prompt, steps, hires_steps))
            self.negative.append(self._encoded(conditioner, negative, steps, hires_steps, self.xl))
            self.used.append(_unique(conditioner.used[before:]))
        self.empty = conditioner.encode([""])[0]

    @staticmethod
    def _encoded(conditioner, prompt: str, steps: int, hires_steps: int | None, zero_if_empty: bool = False
                 ) -> Scheduled:
        entries = schedules(prompt, steps, hires_steps)
        encoded, pooled = conditioner.encode([text for _, text in entries])
        if zero_if_empty and all(text == "" for _, text in entries):
            encoded, pooled = torch.zeros_like(encoded), torch.zeros_like(pooled)
        return [(end, encoded[i:i + 1], None if pooled is None else pooled[i:i + 1])
                for i, (end, _) in enumerate(entries)]

    @property
    def changes(self) -> bool:
        return any(len(s) > 1 for s in self.positive + self.negative)

    def at(self, evaluation: int) -> dict:
        """The pipeline's prompt arguments for the evaluation (counted from 0): `prompt_embeds`
        and `negative_prompt_embeds`, and on SDXL the pooled ones."""
        chunk = self.empty.shape[1]
        out: dict[str, list] = {"prompt_embeds": [], "negative_prompt_embeds": [], "pooled_prompt_embeds": [],
                                "negative_pooled_prompt_embeds": []}
        for p, n in zip(self.positive, self.negative):
            (p, p_pooled), (n, n_pooled) = _current(p, evaluation), _current(n, evaluation)
            longest = max(p.shape[1], n.shape[1]) // chunk
            out["prompt_embeds"].append(pad_to(p, longest, self.empty))
            out["negative_prompt_embeds"].append(pad_to(n, longest, self.empty))
            out["pooled_prompt_embeds"].append(p_pooled)
            out["negative_pooled_prompt_embeds"].append(n_pooled)
        if not self.xl:
            del out["pooled_prompt_embeds"], out["negative_pooled_prompt_embeds"]
        return {name: torch.cat(tensors) for name, tensors in out.items()}

    def switching(self, on_step=None):
        """A `callback_on_step_end` that hands the pipeline the next evaluation's conditioning
        (after running `on_step`, the progress and cancel check)."""
        def step(pipe, index: int, timestep, kwargs: dict) -> dict:
            kwargs = on_step(pipe, index, timestep, kwargs) if on_step is not None else kwargs
            text = self.at(index + 1)
            changed = {"prompt_embeds": (text["negative_prompt_embeds"], text["prompt_embeds"])}
            if self.xl:
                changed["add_text_embeds"] = (text["negative_pooled_prompt_embeds"], text["pooled_prompt_embeds"])
            for name, (negative, positive) in changed.items():
                value = torch.cat([negative, positive]) if pipe.do_classifier_free_guidance else positive
                kwargs = {**kwargs, name: value.to(kwargs[name].dtype)}
            return kwargs

        return step

    @staticmethod
    def tensor_inputs(xl: bool) -> list[str]:
        """What the pipeline must hand `switching`'s callback, and take back from it."""
        return ["latents", "prompt_embeds", "add_text_embeds"] if xl else ["latents", "prompt_embeds"]


def _unique(embeddings: list[Embedding]) -> list[Embedding]:
    return list({id(e): e for e in embeddings}.values())


def _current(scheduled: Scheduled, evaluation: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    # The first entry that lasts to this evaluation; past the last, the first (as the webui does).
    for end, conditioning, pooled in scheduled:
        if evaluation <= end:
            return conditioning, pooled
    return scheduled[0][1], scheduled[0][2]


def read(pipe, texts: Sequence[str], emphasis: Emphasis = "Original", xl: bool = False,
         embeddings: EmbeddingLibrary | None = None) -> tuple[int, list[Embedding]]:
    """How many chunks the longest of these texts encodes to, and the embeddings they use."""
    conditioner = ConditionerXL(pipe, emphasis, embeddings) if xl else \
        Conditioner(pipe, emphasis=emphasis, embeddings=embeddings)
    return max(conditioner.chunk_count(text) for text in texts), _unique(conditioner.used)


def ti_hashes(used: Sequence[Embedding]) -> str | None:
    """The webui's `TI hashes` infotext value: "name: shorthash, ..."."""
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in used) or None
