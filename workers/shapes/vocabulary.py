"""The shapes model's tokenizer: CLIP's byte-level BPE, with merges learned from the
world's own words so that each of them is one token (and any other text still
tokenizes, byte by byte)."""

from __future__ import annotations

from collections import Counter

from workers.shapes import world
from workers.tiny import bytes_to_unicode

#: Long enough for two shapes and a background, with room to spare.
MAX_LENGTH = 32
WORDS = sorted({"a", "an", "and", "on", "background", *world.PALETTE, *world.SHAPES})


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the words (most frequent pair first, ties by name) until
    every word is a single symbol. Applying the merges in order rebuilds each word."""
    spelled = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in spelled.values() for pair in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in spelled.items():
            spelled[word] = _merge(symbols, best)


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_tokenizer():
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(WORDS)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
