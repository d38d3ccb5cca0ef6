"""Token positions of labelled phrases, from the character spans the prompt renderer placed them at.

Shared by both sides: the workers pick each class's cross-attention columns with ``class_token_positions``; the
driver refuses, before any model or Ray starts, a template whose labelled phrase could fall past the text encoder's
context (``latest_phrase_tokens``), loading only the model's tokenizer files (``load_tokenizer``) and, in a real run,
only for templates too long to be cleared by counting characters (``fits_clip_context``).

A token belongs to a class when its character offsets overlap one of the class's phrase spans; nothing else in the
prompt is ever matched, so ``bus`` in "a busy street with a {bus}" takes only the marked word, and every occurrence
counts. BOS sits at position 0 and EOS at the last position kept, so a phrase token must lie below
``model_max_length - 1``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from seediff.schemas.config import TINY_MODEL, ConfigError, RunConfig
from seediff.schemas.prompts import RenderedPrompt, Template

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT = 77


class PhrasePositionError(ValueError):
    """A labelled phrase without tokens the text encoder sees; the message names the phrase and the position."""


def class_token_positions(tokenizer: Any, prompt: RenderedPrompt) -> list[list[int]]:
    """Per class of ``prompt`` (in ``prompt.spans`` order): the positions of every sub-token of every occurrence of
    its phrases, ascending, in the token sequence the text encoder sees."""
    offsets = _offsets(tokenizer, prompt.text)
    limit = tokenizer.model_max_length - 1  # EOS takes the last kept position
    positions = []
    for name, spans in prompt.spans:
        found: list[int] = []
        for start, end in spans:
            hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            phrase = prompt.text[start:end]
            if not hit:
                raise PhrasePositionError(f"labelled phrase {phrase!r} (class {name!r}) has no tokens in {prompt.text!r}")
            if hit[-1] >= limit:
                raise PhrasePositionError(
                    f"labelled phrase {phrase!r} (class {name!r}) ends at token {hit[-1] + 1}, past the text encoder's "
                    f"{tokenizer.model_max_length} tokens (BOS and EOS included): shorten the text before it"
                )
            found += hit
        positions.append(sorted(set(found)))
    return positions


def latest_phrase_tokens(tokenizer: Any, template: Template) -> None:
    """Raise ``PhrasePositionError`` when some rendering of ``template`` puts a labelled phrase past the context.
    Checks the renderings that bound every other (``_bounding_renderings``), counted in the tokenizer's tokens."""
    for rendering in _bounding_renderings(template, partial(_token_count, tokenizer)):
        class_token_positions(tokenizer, rendering)


def fits_clip_context(template: Template) -> bool:
    """True when every rendering of ``template`` certainly keeps its labelled phrases inside a 77-token CLIP context
    (every text encoder of the supported families reads 77), judged without a tokenizer, so a run checks most
    templates without importing transformers. For ASCII text CLIP's byte-level BPE makes at most one token per
    non-space character (lowercasing and its text cleaning never lengthen ASCII), and BOS takes position 0: a phrase
    ending within 75 non-space characters ends by token 75. False (ask the tokenizer) otherwise, and for any
    non-ASCII rendering, where normalisation may change the count."""
    for rendering in _bounding_renderings(template, _characters):
        end = max(end for _, spans in rendering.spans for _, end in spans)
        if not rendering.text.isascii() or _characters(rendering.text[:end]) >= CLIP_CONTEXT - 1:
            return False
    return True


def _bounding_renderings(template: Template, count: Callable[[str], int]) -> list[RenderedPrompt]:
    """Renderings whose phrase positions bound every rendering's, instead of every combination: each choice at its
    longest alternative by ``count``, plus one per alternative that holds a phrase (forced, the other choices
    longest), so the number grows with the alternatives, not their product. CLIP tokenizes words separately, so the
    token count of a rendering is the sum of its pieces' counts wherever alternatives are delimited by spaces or
    punctuation. None when the template labels nothing."""
    if not template.phrases:
        return []
    longest = tuple(
        max(range(len(c.alternatives)), key=lambda k: count(_plain_text(c.alternatives[k]))) for c in template.choices
    )
    variants = {longest}
    for index, choice in enumerate(template.choices):
        for k, alternative in enumerate(choice.alternatives):
            if any(not isinstance(piece, str) for piece in alternative):
                variants.add(longest[:index] + (k,) + longest[index + 1:])
    return [template.render(0, picks) for picks in sorted(variants)]


def _plain_text(pieces: Sequence[Any]) -> str:
    return "".join(p if isinstance(p, str) else p.text for p in pieces)


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _characters(text: str) -> int:
    """Non-space characters: CLIP splits words on whitespace, which takes no token."""
    return sum(not c.isspace() for c in text)


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    encoded = tokenizer(text, truncation=False, return_offsets_mapping=True)
    return [tuple(o) for o in encoded["offset_mapping"]]


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    """Only the tokenizer of ``model`` (hub id or local path; ``tiny``: the offline byte-level tokenizer): a few
    files, no weights."""
    if model == TINY_MODEL:
        return offline_clip_tokenizer()
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)


def offline_clip_tokenizer() -> Any:
    """A byte-level CLIP tokenizer (no merges) written to a temp dir and loaded from it: no network needed."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols GPT-2/CLIP BPE works on
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS])}
    with tempfile.TemporaryDirectory(prefix="tiny-clip-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        # model_max_length is required: without it padding to max length overflows in transformers 5.x.
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def context_check(config: RunConfig, exact: bool) -> Callable[[Template], None]:
    """A check that raises ``PhrasePositionError`` for a template whose labelled phrase could fall past the text
    encoder's context (``latest_phrase_tokens``). ``exact`` (the dry run): every template with the model's tokenizer,
    loaded now. Otherwise the tokenizer (and transformers, which the driver otherwise never imports) loads only for
    a template too long to clear by counting characters."""
    tokenizers = []

    def tokenizer():
        if not tokenizers:
            try:
                tokenizers.append(load_tokenizer(config.model, config.revision))
            except OSError as e:
                raise ConfigError(f"model: cannot load the tokenizer of {config.model!r}: {e}") from e
        return tokenizers[0]

    def check(template: Template) -> None:
        if exact or not fits_clip_context(template):
            latest_phrase_tokens(tokenizer(), template)

    if exact:
        tokenizer()
    return check
