"""The webui's prompt language, read as the webui v1.10.1 reads it (`modules/prompt_parser.py`).

Emphasis: `(text)` multiplies the attention paid to its tokens by 1.1, `[text]` divides it by
1.1, `(text:1.5)` multiplies it by 1.5; brackets nest, so `((text))` is 1.21. `\\(`, `\\)`,
`\\[`, `\\]` and `\\\\` are the characters themselves. A bracket left open applies to the end
of the prompt; a closing one with nothing open is text. `BREAK` (a word of its own, in capitals)
ends the current 75-token chunk.

This module only reads the text; `workers/prompts.py` turns what it reads into conditioning.
"""

from __future__ import annotations

import re
from typing import Literal

#: The webui's emphasis option: "Original" multiplies each token's embedding by its weight and
#: restores the chunk's mean; "No norm" only multiplies; "None" reads brackets as text.
Emphasis = Literal["Original", "No norm", "None"]
EMPHASIS_MODES: tuple[Emphasis, ...] = ("Original", "No norm", "None")

#: The weight that marks a BREAK among the parsed pieces, as the webui marks it.
BREAK_WEIGHT = -1.0
ROUND, SQUARE = 1.1, 1 / 1.1

_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
  | \\                      # a lone backslash
  | [(\[]                   # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.5)" closes a round bracket with its weight
  | [)\]]                   # a closing bracket
  | [^\\()\[\]:]+           # text
  | :                       # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
#: The webui's extra networks (`<lora:name:0.8>`), as `modules/extra_networks.py` finds them.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces, neighbours of equal weight merged; a BREAK is the
    piece ("BREAK", -1.0). The same pieces as the webui's `parse_prompt_attention`."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", BREAK_WEIGHT])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return _merged(pieces or [["", 1.0]])


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"the emphasis weight {text!r} is not a number") from None


def problem(text: str) -> str | None:
    """Why the farm cannot draw this prompt as the webui would, or None."""
    networks = [m.group(0) for m in _EXTRA_NETWORK.finditer(text)]
    if networks:
        return f"{networks[0]}: extra networks (LoRA, hypernetworks) are not supported yet"
    try:
        parse_attention(text)
    except ValueError as e:
        return str(e)
    return None


def _merged(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def pieces(text: str, emphasis: Emphasis = "Original") -> list[tuple[str, float]]:
    """What the encoder is given for `text` under an emphasis mode: with "None", the whole text
    at weight 1 (brackets and BREAK are words), as in the webui."""
    return [(text, 1.0)] if emphasis == "None" else parse_attention(text)


def uses_emphasis(text: str) -> bool:
    """Whether the webui notes the emphasis mode in the infotext for this prompt."""
    return "(" in text or "[" in text
