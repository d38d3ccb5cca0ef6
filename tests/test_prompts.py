"""Prompt templates and labelled phrases: the syntax, per-sample rendering, and the phrase rules — a class's tokens
are where its marked phrase was placed, never a substring hit elsewhere — down to the dry run's refusal of a phrase
past the text encoder's 77 tokens."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from seediff.pipeline.cli import main
from seediff.pipeline.plan import Plan
from seediff.schemas.manifest import ManifestError, class_row, load_manifest
from seediff.schemas.prompts import Choice, Phrase, PromptSyntaxError, label_literal, parse
from seediff.tokens import (
    PhrasePositionError,
    class_token_positions,
    fits_clip_context,
    latest_phrase_tokens,
    offline_clip_tokenizer,
)

BYTES = offline_clip_tokenizer()  # the tiny model's: BOS, then one token per non-space character


def byte_positions(text: str, start: int, end: int) -> list[int]:
    """Independent model of the byte-level tokenizer: the token of character j (ASCII, not a space) sits at 1 + the
    number of non-space characters before it."""
    return [1 + sum(c != " " for c in text[:j]) for j in range(start, end) if text[j] != " "]


@pytest.fixture(scope="module")
def words() -> CLIPTokenizer:
    """A BPE CLIP tokenizer whose merges make "bus", "busy", "cat" and "scattered" single tokens, as real CLIP's do:
    a substring search for "bus" would hit the token "busy</w>"."""
    symbols = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    merges = ["b u", "bu s", "bus y</w>", "bu s</w>", "c a", "ca t</w>", "s ca", "sca t", "scat t", "scatt e",
              "scatte r", "scatter e", "scattere d</w>"]
    pieces = [a + b for a, b in (m.split() for m in merges)]
    vocab = symbols + [s + "</w>" for s in symbols] + pieces + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(dict.fromkeys(vocab))}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def positions(tokenizer, template: str, seed: int = 0) -> dict[str, list[int]]:
    prompt = parse(template).render(seed)
    return dict(zip(prompt.class_names, class_token_positions(tokenizer, prompt)))


# ---------------------------------------------------------------- syntax


def test_parse_phrases_choices_and_escapes():
    template = parse(r"a {dog} and a {puppy:dog} under a [table|{chair}] \{not\} a\|b \[x\] c\:d \q")
    assert template.parts == (
        "a ", Phrase("dog", "dog"), " and a ", Phrase("puppy", "dog"), " under a ",
        Choice((("table",), (Phrase("chair", "chair"),))), r" {not} a|b [x] c:d \q",
    )
    assert [p.class_name for p in template.phrases] == ["dog", "dog", "chair"]


@pytest.mark.parametrize(
    "template,problem",
    [
        ("a {dog", "column 3: unbalanced '{'"),
        ("a dog}", "column 6: '}' outside a group"),
        ("a [cat|dog", "column 3: unbalanced '['"),
        ("a cat]", "column 6: ']' outside a group"),
        ("a [cat||dog]", "column 3: empty alternative in [...] (alternative 2)"),
        ("a [ |dog]", "column 3: empty alternative in [...] (alternative 1)"),
        ("a []", "column 3: empty alternative"),
        ("a [x [y|z]]", "nested '['"),
        ("a {}", "column 3: empty class name"),
        ("a {:dog}", "column 3: empty phrase"),
        ("a {puppy:}", "column 3: empty class name"),
        ("a {[dog]}", "'[' inside a labelled phrase"),
        ("a | b", "'|' outside [...] (write \\| for a literal bar)"),
        ("a {dog }", "starts or ends with a space"),
        ("a {dog}\u200b", "column 8: zero-width or format character U+200B"),
        ("a {dog}\x07", "column 8: control character U+0007"),
    ],
)
def test_syntax_errors_name_the_column(template, problem):
    with pytest.raises(PromptSyntaxError) as info:
        parse(template)
    assert problem in str(info.value)


def test_render_spans_and_a_seed_pure_choice():
    template = parse("a [photo|painting|close-up photo] of a {puppy:dog} [in a park|on a beach|indoors] near a {cat}")
    prompt = template.render(12345)
    assert template.render(12345) == prompt  # a pure function of the seed
    for name, spans in prompt.spans:
        assert [prompt.text[a:b] for a, b in spans] == [{"dog": "puppy", "cat": "cat"}[name]]
    texts = {template.render(seed).text for seed in range(200)}
    assert len(texts) == 9  # every combination is drawn
    assert {t.split(" of ")[0] for t in texts} == {"a photo", "a painting", "a close-up photo"}


# ---------------------------------------------------------------- phrase rules, by token position


def test_bus_in_busy_street_takes_only_the_marked_bus(words):
    text = "a busy street with a bus"
    ids = words(text)["input_ids"]
    assert words.convert_ids_to_tokens(ids)[2] == "busy</w>"  # one token: a substring search for "bus" hits it
    assert positions(words, "a busy street with a {bus}") == {"bus": [ids.index(words.convert_tokens_to_ids("bus</w>"))]}
    assert positions(BYTES, "a busy street with a {bus}") == {"bus": byte_positions(text, 21, 24)} == {"bus": [17, 18, 19]}
    # a class-table row with a literal prompt: the whole word, not the "bus" inside "busy"
    (template,) = class_row("bus", 1, 1, text).prompts
    prompt = template.render(0)
    assert class_token_positions(BYTES, prompt) == [[17, 18, 19]]


def test_cat_in_scattered_takes_only_the_marked_cat(words):
    text = "a scattered pile of toys next to a cat"
    tokens = words.convert_ids_to_tokens(words(text)["input_ids"])
    assert tokens[2] == "scattered</w>"
    assert positions(words, "a scattered pile of toys next to a {cat}") == {"cat": [tokens.index("cat</w>")]}
    assert positions(BYTES, "a scattered pile of toys next to a {cat}") == {"cat": byte_positions(text, 35, 38)}
    (template,) = class_row("cat", 1, 1, text).prompts
    assert class_token_positions(BYTES, template.render(0)) == [byte_positions(text, 35, 38)]


def test_a_phrase_used_twice_counts_both_occurrences():
    text = "a dog chasing another dog"
    assert positions(BYTES, "a {dog} chasing another {dog}") == {
        "dog": byte_positions(text, 2, 5) + byte_positions(text, 22, 25)
    }
    with pytest.raises(PromptSyntaxError, match="contains 2 times the class name 'dog'.*mark the labelled phrase"):
        class_row("dog", 1, 1, text)  # a literal prompt is ambiguous: refused, not silently the first


def test_puppy_labelled_dog():
    prompt = parse("a {puppy:dog} on grass").render(0)
    assert prompt.text == "a puppy on grass"
    assert dict(zip(prompt.class_names, class_token_positions(BYTES, prompt))) == {
        "dog": byte_positions(prompt.text, 2, 7)
    }


def test_case_and_unicode_forms(tmp_path):
    # case: {Dog} and {dog} are one class; the text keeps what was written
    path = tmp_path / "scenes.csv"
    path.write_text("prompt,num_samples\na {Dog} and a {cat},1\na {dog} alone,1\n", encoding="utf-8")
    manifest = load_manifest(path)
    assert [(c.name, c.class_id) for c in manifest.classes] == [("Dog", 1), ("cat", 2)]
    spec = Plan(manifest.rows, 0, 10).sample(1)
    assert spec.prompt.text == "a dog alone" and [c.class_id for c in spec.classes] == [1]
    # non-ASCII phrases: every byte token of the phrase, nothing else
    text = "une crème brûlée sur la table"
    assert positions(BYTES, "une {crème brûlée:dessert} sur la table")["dessert"] == [
        i for i, (a, b) in enumerate(BYTES(text, return_offsets_mapping=True)["offset_mapping"]) if 4 <= a < 16 and b > a
    ]
    # the same class name in NFC and NFD forms is refused, naming both lines
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    path.write_text(f"prompt,num_samples\na {{{nfc}}},1\na {{{nfd}}},1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"scenes.csv:3: prompt: class name .* differs from .* \(.*scenes.csv:2\) "
                       "only by Unicode normalisation"):
        load_manifest(path)
    path.write_text("prompt,num_samples\na {dog}\u200b,1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"scenes.csv:2: prompt: column 8: zero-width or format character U\+200B"):
        load_manifest(path)


def test_phrase_past_the_context_is_refused_by_position():
    long = "x " * 80
    with pytest.raises(PhrasePositionError, match=r"labelled phrase 'dog' \(class 'dog'\) ends at token 84, past the "
                       "text encoder's 77 tokens"):
        positions(BYTES, long + "{dog}")
    # the last position a phrase token may take is 75 (76 is EOS): 72 x's + "dog" ends exactly there
    assert positions(BYTES, "x " * 72 + "{dog}") == {"dog": [73, 74, 75]}
    with pytest.raises(PhrasePositionError, match="ends at token 77"):
        positions(BYTES, "x " * 73 + "{dog}")


def test_the_bound_uses_each_choice_at_its_longest_alternative():
    # picks that would render short still count: the longest alternative before the phrase decides
    latest_phrase_tokens(BYTES, parse("[a|b] " + "x " * 70 + "{dog}"))
    with pytest.raises(PhrasePositionError, match="ends at token 78"):
        latest_phrase_tokens(BYTES, parse("[a|" + "y" * 4 + "] " + "x " * 70 + "{dog}"))
    # a phrase inside an alternative is checked with that alternative chosen
    with pytest.raises(PhrasePositionError, match=r"'cat' \(class 'cat'\)"):
        latest_phrase_tokens(BYTES, parse("x " * 74 + "[a {cat}|a dog]"))
    # alternatives after every phrase do not matter
    latest_phrase_tokens(BYTES, parse("a {dog} " + "[" + "z " * 90 + "|w]"))


def test_counting_characters_clears_only_templates_that_certainly_fit():
    # the byte-level tokenizer makes exactly one token per non-space character, so it meets the bound: 72 x's and
    # "dog" end at token 75, the last a phrase may take
    assert fits_clip_context(parse("x " * 72 + "{dog}"))
    assert not fits_clip_context(parse("x " * 73 + "{dog}"))
    # each choice counts at its longest alternative, a phrase in an alternative with that alternative chosen
    assert not fits_clip_context(parse("[a|" + "y" * 4 + "] " + "x " * 70 + "{dog}"))
    assert not fits_clip_context(parse("x " * 74 + "[a {cat}|a dog]"))
    assert fits_clip_context(parse("a {dog} " + "[" + "z " * 90 + "|w]"))
    # outside ASCII the count may change under normalisation: the tokenizer decides
    assert not fits_clip_context(parse("une {crème brûlée:dessert}"))
    # wherever the count clears a template, the tokenizer agrees
    for n in range(60, 80):
        template = parse("x " * n + "[a|bb] {dog} [c|d]")
        if fits_clip_context(template):
            latest_phrase_tokens(BYTES, template)


@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_phrase_past_token_77_is_refused_with_exit_2_before_ray(tmp_path, capsys, mode):
    scenes = tmp_path / "scenes.csv"
    scenes.write_text(f"prompt,num_samples\na {{dog}} and a {{cat}},2\n\"{'x ' * 70}[a|a big] {{cat}}\",1\n")
    code = main(["generate", str(scenes), "--out", str(tmp_path / "out"), "--model", "tiny", *mode])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{scenes}:3: prompt: labelled phrase 'cat' (class 'cat') ends at token 78, past the text encoder's 77" in err
    assert not (tmp_path / "out").exists()  # refused before any output, model or Ray


def test_dry_run_checks_prompts_file_templates_by_their_line(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# templates\na [photo|painting] of a {class_name}\n" + "x " * 80 + "{class_name}\n")
    args = ["generate", str(classes), "--out", str(tmp_path / "out"), "--model", "tiny", "--dry-run",
            "--samples-per-class", "2", "--prompts", str(prompts)]
    assert main(args) == 2
    assert f"{prompts}:3: prompt: labelled phrase 'cat' (class 'cat') ends at token" in capsys.readouterr().err
    prompts.write_text("# templates\na [photo|painting] of a {class_name}\n{class_name}, [studio|outdoor] light\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 rows, 2 classes" in out and "classes cat=1" in out


def test_literal_label_is_refused_when_absent_and_whole_words_only():
    with pytest.raises(PromptSyntaxError, match="does not contain the class name 'cat' as a whole word"):
        label_literal(parse("a scattered pile"), "cat")
    with pytest.raises(PromptSyntaxError, match="does not contain"):
        label_literal(parse("a [cat|dog]"), "cat")  # inside alternatives only: mark it instead
    assert label_literal(parse("A Golden Retriever, [photo|sketch]"), "golden retriever").phrases == (
        Phrase("Golden Retriever", "golden retriever"),
    )
