"""Prompt templates: labelled class phrases and alternatives, parsed once and rendered per sample.

Syntax (fixed; the manifest checks and the dry run depend on it):

* ``{dog}`` is a labelled phrase: it renders ``dog`` and labels it class ``dog``.
* ``{puppy:dog}`` renders ``puppy`` and labels it class ``dog``.
* ``[a|b|c]`` is a choice: one alternative per sample. Alternatives may hold labelled phrases, not other choices.
* ``\\{``, ``\\}``, ``\\[``, ``\\]``, ``\\|``, ``\\:`` and ``\\\\`` are the literal characters; any other backslash is
  literal too.

Rendering returns the text *and* every labelled phrase's character span, so a class's token positions come from where
its phrase was placed, never from searching the text (``seediff.tokens``). Every choice is a pure function of the
sample seed and the choice's position in the template (a keyed hash, no RNG state), so a sample's prompt does not
depend on shard size, batch size, actors or retries.

Pure Python; no torch, no tokenizer.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

ESCAPABLE = frozenset("{}[]|:\\")


class PromptSyntaxError(ValueError):
    """A template that cannot be parsed; the message names the column (1-based) and the problem. The manifest
    prefixes it with ``file:line: field:``."""


@dataclass(frozen=True)
class Phrase:
    """A labelled phrase: ``text`` is what the prompt shows, ``class_name`` the class it labels (as written)."""

    text: str
    class_name: str


@dataclass(frozen=True)
class Choice:
    alternatives: tuple[tuple[Union[str, Phrase], ...], ...]


Part = Union[str, Phrase, Choice]


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt text of one sample and, per labelled class (in order of first appearance in the text), the
    character spans [start, end) of its phrases."""

    text: str
    spans: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.spans)


@dataclass(frozen=True)
class Template:
    source: str = field(compare=False)  # as written, for messages; equal parts render equal prompts
    parts: tuple[Part, ...] = ()

    @property
    def phrases(self) -> tuple[Phrase, ...]:
        """Every labelled phrase, in template order (also those inside alternatives)."""
        found: list[Phrase] = []
        for part in self.parts:
            if isinstance(part, Phrase):
                found.append(part)
            elif isinstance(part, Choice):
                found += [p for alternative in part.alternatives for p in alternative if isinstance(p, Phrase)]
        return tuple(found)

    @property
    def always_labels(self) -> bool:
        """Every rendering holds a labelled phrase: one outside the choices, or one in every alternative of a choice."""
        return any(
            isinstance(part, Phrase)
            or isinstance(part, Choice)
            and all(any(isinstance(p, Phrase) for p in alternative) for alternative in part.alternatives)
            for part in self.parts
        )

    @property
    def choices(self) -> tuple[Choice, ...]:
        return tuple(p for p in self.parts if isinstance(p, Choice))

    def render(self, seed: int, picks: tuple[int, ...] | None = None) -> RenderedPrompt:
        """The sample's prompt. ``picks`` (one alternative index per choice) overrides the seed's picks; the dry
        run uses it to render the longest variants."""
        if picks is None:
            picks = tuple(draw(seed, f"choice-{i}", len(c.alternatives)) for i, c in enumerate(self.choices))
        text: list[str] = []
        spans: dict[str, list[tuple[int, int]]] = {}
        length = 0
        choice_index = 0
        for part in self.parts:
            if isinstance(part, Choice):
                pieces: tuple[Union[str, Phrase], ...] = part.alternatives[picks[choice_index]]
                choice_index += 1
            else:
                pieces = (part,)
            for piece in pieces:
                if isinstance(piece, Phrase):
                    spans.setdefault(piece.class_name, []).append((length, length + len(piece.text)))
                    piece = piece.text
                text.append(piece)
                length += len(piece)
        return RenderedPrompt("".join(text), tuple((name, tuple(s)) for name, s in spans.items()))


CLASS_PLACEHOLDER = "class_name"  # ``{class_name}`` / ``{phrase:class_name}``: the phrase of the class a row is for


def class_template(source: str) -> Template:
    """A template shared by classes (``prompt_template``, a prompts file's line): parsed with the one syntax of this
    module, and it must mark the class as ``{class_name}`` or ``{phrase:class_name}``. ``PromptSyntaxError``
    otherwise."""
    template = parse(source)
    if not any(p.class_name == CLASS_PLACEHOLDER for p in template.phrases):
        raise PromptSyntaxError(f"{source!r} must contain {{{CLASS_PLACEHOLDER}}} (or {{phrase:{CLASS_PLACEHOLDER}}})")
    return template


def substituted(template: Template, phrase_parts: Callable[[Phrase], tuple[Part, ...]]) -> Template:
    """``template`` with each labelled phrase replaced by the parts ``phrase_parts`` gives for it (inside choices
    too): relabelling one phrase, or listing several classes in place of ``{class_name}``."""

    def pieces(part: Part) -> tuple[Part, ...]:
        if isinstance(part, Phrase):
            return phrase_parts(part)
        if isinstance(part, Choice):
            return (Choice(tuple(sum((pieces(q) for q in alternative), ()) for alternative in part.alternatives)),)
        return (part,)

    return Template(template.source, sum((pieces(p) for p in template.parts), ()))


def draw(seed: int, purpose: str, n: int) -> int:
    """An index in [0, n) that depends only on (seed, purpose): blake2b, stable across Python versions and machines.
    The modulo bias is below n / 2^64."""
    digest = hashlib.blake2b(
        seed.to_bytes(8, "little") + purpose.encode(), digest_size=8, person=b"seediff-prompt"
    ).digest()
    return int.from_bytes(digest, "little") % n


def parse(source: str) -> Template:
    """Parse a template; ``PromptSyntaxError`` names the column of the first problem."""
    return Template(source, tuple(_Parser(source).parse()))


def label_literal(template: Template, class_name: str) -> Template:
    """A template without labelled phrases, with the one whole-word, case-insensitive occurrence of ``class_name`` in
    its fixed text labelled. Refused when the class name is absent or occurs more than once (mark it with ``{...}``
    then)."""
    pattern = re.compile(rf"(?<!\w){re.escape(class_name)}(?!\w)", re.IGNORECASE)
    hits = [(i, m) for i, part in enumerate(template.parts) if isinstance(part, str) for m in pattern.finditer(part)]
    if len(hits) != 1:
        problem = "does not contain" if not hits else f"contains {len(hits)} times"
        raise PromptSyntaxError(
            f"{template.source!r} {problem} the class name {class_name!r} as a whole word outside [...]; "
            f"mark the labelled phrase as {{{class_name}}} or {{phrase:{class_name}}}"
        )
    (index, match), = hits
    text = template.parts[index]
    assert isinstance(text, str)
    split = tuple(p for p in (text[: match.start()], Phrase(match.group(), class_name), text[match.end():]) if p)
    return Template(template.source, template.parts[:index] + split + template.parts[index + 1:])


def check_text(text: str) -> None:
    """Reject characters that render invisibly or differently: control and format (zero-width) characters."""
    for column, char in enumerate(text, 1):
        category = unicodedata.category(char)
        if category in ("Cc", "Cf"):
            kind = "control" if category == "Cc" else "zero-width or format"
            raise PromptSyntaxError(f"column {column}: {kind} character U+{ord(char):04X} in {text!r}")


class _Parser:
    def __init__(self, source: str):
        check_text(source)
        self.source = source
        self.i = 0

    def parse(self) -> list[Part]:
        parts: list[Part] = []
        literal: list[str] = []
        while self.i < len(self.source):
            char = self.source[self.i]
            if char in "{[":
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(self._phrase() if char == "{" else self._choice())
            elif char in "}]|":
                hint = "write \\| for a literal bar" if char == "|" else f"unbalanced; write \\{char} for a literal one"
                self._fail(f"{char!r} outside {'[...]' if char == '|' else 'a group'} ({hint})")
            else:
                literal.append(self._char())
        if literal:
            parts.append("".join(literal))
        return parts

    def _char(self) -> str:
        """The next literal character, consuming an escape."""
        char = self.source[self.i]
        if char == "\\" and self.i + 1 < len(self.source) and self.source[self.i + 1] in ESCAPABLE:
            self.i += 2
            return self.source[self.i - 1]
        self.i += 1
        return char

    def _phrase(self) -> Phrase:
        start = self.i
        self.i += 1
        text: list[str] = []
        colon = None
        while True:
            if self.i >= len(self.source):
                self._fail("unbalanced '{': no closing '}'", start)
            char = self.source[self.i]
            if char == "}":
                self.i += 1
                break
            if char in "{[]|":
                self._fail(f"{char!r} inside a labelled phrase {{...}}")
            if char == ":" and colon is None:
                colon = len(text)
                self.i += 1
                continue
            text.append(self._char())
        body = "".join(text)
        shown, name = (body, body) if colon is None else (body[:colon], body[colon:])
        if not name.strip():
            self._fail("empty class name in {...}", start)
        if not shown.strip():
            self._fail("empty phrase in {...}", start)
        if shown != shown.strip():
            self._fail(f"phrase {shown!r} starts or ends with a space; put spaces outside {{...}}", start)
        return Phrase(shown, name.strip())

    def _choice(self) -> Choice:
        start = self.i
        self.i += 1
        alternatives: list[tuple[Union[str, Phrase], ...]] = []
        current: list[Union[str, Phrase]] = []
        literal: list[str] = []
        while True:
            if self.i >= len(self.source):
                self._fail("unbalanced '[': no closing ']'", start)
            char = self.source[self.i]
            if char in "|]":
                if literal:
                    current.append("".join(literal))
                    literal = []
                if not any(isinstance(p, Phrase) or p.strip() for p in current):
                    self._fail(f"empty alternative in [...] (alternative {len(alternatives) + 1})", start)
                alternatives.append(tuple(current))
                current = []
                self.i += 1
                if char == "]":
                    return Choice(tuple(alternatives))
            elif char == "{":
                if literal:
                    current.append("".join(literal))
                    literal = []
                current.append(self._phrase())
            elif char in "[}":
                self._fail("nested '[' inside [...]" if char == "[" else "unbalanced '}' inside [...]")
            else:
                literal.append(self._char())

    def _fail(self, problem: str, at: int | None = None) -> None:
        raise PromptSyntaxError(f"column {(self.i if at is None else at) + 1}: {problem} in {self.source!r}")
