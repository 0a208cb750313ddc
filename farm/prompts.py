"""The webui's prompt language, read as the webui v1.10.1 reads it (`modules/prompt_parser.py`).

Emphasis: `(text)` multiplies the attention paid to its tokens by 1.1, `[text]` divides it by
1.1, `(text:1.5)` multiplies it by 1.5; brackets nest, so `((text))` is 1.21. `\\(`, `\\)`,
`\\[`, `\\]` and `\\\\` are the characters themselves. A bracket left open applies to the end
of the prompt; a closing one with nothing open is text. `BREAK` (a word of its own, in capitals)
ends the current 75-token chunk. `<lora:NAME:WEIGHT>` names a LoRA and is taken out of the text.

Prompt editing: `[from:to:when]` draws `from` until step `when`, then `to`; `[to:when]` adds,
`[from::when]` removes; `when` is a step number, or with a decimal point a fraction of the
steps. `[a|b|c]` alternates every step. `schedules` gives the texts of a prompt and the last
step each holds, as the webui's `get_learned_conditioning_prompt_schedules` does (its grammar,
read with the same parser, lark 1.1.2, so that ambiguous text resolves the same way).

This module only reads the text; `workers/prompts.py` turns what it reads into conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import lark

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


@dataclass(frozen=True)
class LoraRef:
    """`<lora:NAME:WEIGHT>` or `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` (or `te=`, `unet=` by name)."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    @property
    def shown(self) -> str:
        return f"<lora:{self.name}:{self.te:g}>" if self.te == self.unet else \
            f"<lora:{self.name}:{self.te:g}:{self.unet:g}>"


def extra_networks(text: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its `<...>` tags, and the LoRAs they name, in order (as the webui's
    `extra_networks.parse_prompt` and its Lora network read them). ValueError names a tag that
    is no LoRA or whose weight is no number."""
    loras: list[LoraRef] = []

    def found(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind != "lora":
            raise ValueError(f"{match.group(0)}: the farm applies LoRA (<lora:...>) only, not {kind}")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        if not positional or not positional[0]:
            raise ValueError(f"{match.group(0)}: names no LoRA")
        try:
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
        except ValueError:
            raise ValueError(f"{match.group(0)}: a LoRA weight must be a number") from None
        loras.append(LoraRef(positional[0], te, unet))
        return ""

    return _EXTRA_NETWORK.sub(found, text), loras


def problem(text: str, negative: bool = False) -> str | None:
    """Why the farm cannot draw this prompt as the webui would, or None."""
    try:
        stripped, loras = extra_networks(text)
        if loras and negative:
            return f"{loras[0].shown}: a LoRA applies from the prompt, not the negative prompt"
        parse_attention(stripped)
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


# --- prompt editing and alternation ----------------------------------------------------------------

_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@lru_cache(maxsize=1)
def _schedule_parser() -> lark.Lark:
    return lark.Lark(_SCHEDULE_GRAMMAR)


def schedules(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), ...] for a prompt sampled over `steps`, the steps counted from 1.
    With `hires_steps`, the schedule of hires fix's second pass: a step number counts on from
    the first pass (`[a:b:25]` with 20 + 10 steps switches at the second pass' fifth step) and
    a fraction above 1 is a fraction of the second pass (`1.5`: half-way through it)."""
    try:
        tree = _schedule_parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(hires_steps or steps, prompt)]
    total = steps if hires_steps is None else hires_steps
    offsets = (0, 0.0) if hires_steps is None else (steps, 1.0)
    switches, when = {total}, {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = str(node.children[-2])
            value = (float(number) - offsets[1]) * total if "." in number else float(number) - offsets[0]
            when[id(node)] = min(total, int(value))
            if when[id(node)] >= 1:
                switches.add(when[id(node)])
        elif node.data == "alternate":
            switches.update(range(1, total + 1))
    return [(step, _text_at(tree, step, when)) for step in sorted(switches)]


def _text_at(node, step: int, when: dict[int, int]) -> str:
    if node is None:
        return ""
    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "scheduled":
        before, after = node.children[0], node.children[1]
        return _text_at(before if step <= when[id(node)] else after, step, when)
    if node.data == "alternate":
        options = node.children
        return _text_at(options[(step - 1) % len(options)], step, when)
    if node.data == "plain":
        return str(node.children[0])
    return "".join(_text_at(child, step, when) for child in node.children)
