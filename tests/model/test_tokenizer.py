"""HybridTokenizer: the seed's examples and file format, readable decoding, exact streaming,
and the round-trip properties from issue 2 (hypothesis on arbitrary Unicode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm_trio.model.tokenizer import (
    BOS,
    CHAR_END,
    CHAR_START,
    ENDOFTEXT,
    EOS,
    PAD,
    SPLIT_CHARS,
    UNK,
    HybridTokenizer,
    TooManyTokensError,
    build_vocab,
)

SEED_VOCAB = (
    Path(__file__).resolve().parents[3] / "shared" / "seed" / "tinystories_tokenizer_vocab.json"
)

CORPUS = """Once upon a time, there was a little girl named Lily. She liked to play in the park!
"Hello," said Tom. "Let's play a game." Lily smiled: "Yes; I'd love to!"
They played all day - it was a well-known park (the big one) with [many] {trees}?
<|endoftext|>
Once upon a time, a dog ran to the park. The dog was happy. The end."""


@pytest.fixture(scope="module")
def tok() -> HybridTokenizer:
    """Every corpus word and character is in the vocabulary (split characters are words)."""
    return build_vocab([CORPUS], n_words=200, n_chars=60)


@pytest.fixture(scope="module")
def small() -> HybridTokenizer:
    """Few words and characters: most words are spelled, some characters are <UNK>."""
    return build_vocab([CORPUS], n_words=8, n_chars=12)


@pytest.fixture(scope="module")
def seed() -> HybridTokenizer:
    if not SEED_VOCAB.exists():
        pytest.skip(
            f"the seed vocabulary is not at {SEED_VOCAB} (CI has ../shared beside the clone)"
        )
    return HybridTokenizer.from_file(SEED_VOCAB)


# --------------------------------------------------------------------------- the seed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("this morning i walk", [2, 139, 730, 34, 284, 3]),
        ("Hello, World!", [2, 339, 8, 583, 26, 3]),
        (
            "The xylophone",
            [2, 7, 4, 3251, 3252, 3239, 3242, 3243, 3235, 3242, 3241, 3232, 5, 3],
        ),
        ("a\tb  c", [2, 10, 4, 3229, 5, 4, 3230, 5, 3]),
    ],
)
def test_seed_examples(seed, text, expected):
    # ORIGINAL.md lists what the original produced, with its trailing EOS; ours stops before it.
    assert expected[-1] == EOS
    assert seed.encode(text) == expected[:-1]
    assert seed.encode(text, bos=False) == expected[1:-1]


def test_seed_sizes_and_file_format(seed, tmp_path):
    assert (seed.n_words, seed.n_chars, seed.vocab_size) == (3206, 60, 3266)
    original = json.loads(SEED_VOCAB.read_text(encoding="utf-8"))
    assert seed.to_dict() == original
    assert list(seed.to_dict()) == list(original)  # same key order as the original writes
    seed.save(tmp_path / "vocab.json")
    assert (tmp_path / "vocab.json").read_bytes() == SEED_VOCAB.read_bytes()


def test_seed_decode_reads_like_text(seed):
    ids = seed.encode('"Hello," said Tom. "Let\'s go!" The xylophone was well-known.')
    assert seed.decode(ids) == '"hello," said tom. "let\'s go!" the xylophone was well-known.'


# --------------------------------------------------------------------------- encode


def test_encode_rules(tok):
    ids = tok.encode("Lily  PLAYED\tin\nthe park!")
    assert ids[0] == BOS
    words = ["lily", "played", "in", "the", "park", "!"]
    assert ids[1:] == [tok.to_dict()["word_to_id"][w] for w in words]
    assert EOS not in ids  # never appended
    assert tok.encode("", bos=True) == [BOS]
    assert tok.encode("  \n ", bos=False) == []


def test_split_characters_are_separate_tokens(tok):
    w = tok.to_dict()["word_to_id"]
    for c in SPLIT_CHARS:
        assert tok.encode(f"a{c}dog", bos=False) == [w["a"], w[c], w["dog"]], c


def test_endoftext_becomes_eos(tok):
    w = tok.to_dict()["word_to_id"]
    assert tok.encode("the end.<|endoftext|>Once", bos=False) == [
        w["the"],
        w["end"],
        w["."],
        EOS,
        w["once"],
    ]
    assert tok.encode("<|ENDOFTEXT|>", bos=False) == [EOS]  # lowercased first


def test_unknown_words_are_spelled(tok):
    d = tok.to_dict()
    char = {c: i + tok.n_words for c, i in d["char_to_id"].items()}
    assert tok.encode("dog zebra", bos=False) == [
        d["word_to_id"]["dog"],
        CHAR_START,
        UNK,  # no 'z' in the corpus
        char["e"],
        char["b"],
        char["r"],
        char["a"],
        CHAR_END,
    ]


def test_special_names_in_text_are_not_specials(tok):
    ids = tok.encode("<PAD> <BOS>", bos=False)
    assert ids[0] == CHAR_START and PAD not in ids and BOS not in ids


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Hello, world! It's a well-known (odd) tale.",
            "hello, world! it's a well-known (odd) tale.",
        ),
        (
            '"Hello," said Tom. "Let\'s play!" Lily smiled: "Yes; I\'d love to!"',
            '"hello," said tom. "let\'s play!" lily smiled: "yes; i\'d love to!"',
        ),
        ('Lily said, "hi."  ( [ { Park } ] ) ?', 'lily said, "hi." ([{park}])?'),
        ("a - b -- c", "a-b--c"),
        ("  many\n\ttrees  ", "many trees"),
    ],
)
def test_decode_reads_like_text(tok, text, expected):
    assert tok.decode(tok.encode(text)) == expected


def test_spelled_punctuation_spaces_like_the_word():
    # Only x, y, z are words: every split character here is spelled with CHAR_START/CHAR_END.
    t = build_vocab(["x x x y y y z z z \" ' - ( ) [ ] { } . , ! ? ; :"], n_words=3, n_chars=30)
    assert t.encode("(", bos=False) == [
        CHAR_START,
        t.n_words + t.to_dict()["char_to_id"]["("],
        CHAR_END,
    ]
    text = '"x," y z: (z) [x-y\'z] {y}! "z?" x; y.'
    assert t.decode(t.encode(text)) == text


def test_decode_unk_and_specials(tok):
    ids = tok.encode("Zoe went 🦄 home.", bos=True)
    assert tok.decode(ids) == "\ufffdoe went \ufffd home."
    assert tok.decode([PAD, BOS, EOS, CHAR_START, CHAR_END, PAD]) == ""
    assert tok.decode([UNK]) == "\ufffd"


def test_quote_parity_resets_at_story_boundaries(tok):
    ids = tok.encode('the " end<|endoftext|>" hi " tom')
    assert tok.decode(ids) == 'the "end "hi" tom'


@pytest.mark.parametrize("bad", [-1, 10**6, "vocab_size"])
def test_out_of_range_ids_raise_value_error(tok, bad):
    bad_id = tok.vocab_size if bad == "vocab_size" else bad
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
        tok.decode([BOS, bad_id])
    with pytest.raises(ValueError, match="out of range"):
        tok.token_text(bad_id)
    decoder = tok.stream_decoder()
    assert decoder.push(tok.encode("dog", bos=False)[0]) == "dog"
    with pytest.raises(ValueError):
        decoder.push(bad_id)
    assert decoder.push(tok.encode("ran", bos=False)[0]) == " ran"  # state unharmed


def test_non_integer_id_raises_value_error(tok):
    with pytest.raises(ValueError, match="integer"):
        tok.decode([1.5])


def test_malformed_sequences(tok):
    d = tok.to_dict()
    c = {ch: i + tok.n_words for ch, i in d["char_to_id"].items()}
    dog = d["word_to_id"]["dog"]
    # stray CHAR_END ignored; characters outside a spelled word form one word
    assert tok.decode([CHAR_END, dog, c["a"], c["b"], CHAR_END, dog]) == "dog ab dog"
    # CHAR_START inside a spelled word ends it; a word id ends an unclosed one
    assert tok.decode([CHAR_START, c["a"], CHAR_START, c["b"], dog, c["e"]]) == "a b dog e"
    # UNK inside a spelled word is a character; EOS ends the word
    assert tok.decode([c["a"], UNK, EOS, c["b"]]) == "a\ufffd b"
    # an empty spelled word writes nothing
    assert tok.decode([dog, CHAR_START, CHAR_END, dog]) == "dog dog"


def test_stream_deltas(tok):
    ids = tok.encode('"Hi," said Zed.')
    decoder = tok.stream_decoder()
    deltas = [decoder.push(i) for i in ids]
    # "hi" is spelled (not a corpus word): its characters arrive one by one, no text held back
    assert deltas == [
        "",
        '"',
        "",
        "h",
        "i",
        "",
        ",",
        '"',
        " said",
        "",
        " \ufffd",
        "e",
        "d",
        "",
        ".",
    ]


def test_token_text(tok):
    d = tok.to_dict()
    assert tok.token_text(d["word_to_id"]["lily"]) == "lily"
    assert tok.token_text(tok.n_words + d["char_to_id"]["e"]) == "e"
    assert tok.token_text(UNK) == "\ufffd"
    assert [tok.token_text(i) for i in (PAD, BOS, EOS, CHAR_START, CHAR_END)] == [
        "<PAD>",
        "<BOS>",
        "<EOS>",
        "<CHAR_START>",
        "<CHAR_END>",
    ]


# --------------------------------------------------------------------------- build_vocab / format


def test_build_vocab_sizes_and_order():
    texts = ["b a a c c c", "a! d<|endoftext|>e e"]
    t = build_vocab(texts, n_words=3, n_chars=2)
    d = t.to_dict()
    # counts: a 3, c 3, e 2, b 1, d 1, ! 1; ties by code point; the separator is not a word
    assert list(d["word_to_id"])[6:] == ["a", "c", "e"]
    assert list(d["char_to_id"]) == ["a", "c"]  # chars: a 3, c 3, e 2, ...
    assert (t.n_words, t.n_chars, t.vocab_size) == (9, 2, 11)
    assert d["vocab_size"] == 3
    assert d["special_tokens"] == {
        "<PAD>": 0,
        "<UNK>": 1,
        "<BOS>": 2,
        "<EOS>": 3,
        "<CHAR_START>": 4,
        "<CHAR_END>": 5,
    }


def test_build_vocab_chars_weighted_by_word_frequency_and_sorted():
    t = build_vocab(["zz zz zz yyy x"], n_words=0, n_chars=2)
    assert list(t.to_dict()["char_to_id"]) == ["y", "z"]  # z 6, y 3, x 1; ids in code point order
    assert t.n_words == 6


def test_build_vocab_small_corpus_uses_what_exists():
    t = build_vocab(["one two two"], n_words=3200, n_chars=60)
    assert (t.n_words, t.n_chars) == (6 + 2, 5)  # o n e t w
    assert t.to_dict()["vocab_size"] == 3200


def test_build_vocab_leaves_out_replacement_char():
    t = build_vocab(["a\ufffd \ufffd b"])
    d = t.to_dict()
    assert not any("\ufffd" in w for w in d["word_to_id"]) and "\ufffd" not in d["char_to_id"]


def test_from_dict_errors(tok):
    good = tok.to_dict()
    with pytest.raises(ValueError, match="word_to_id"):
        HybridTokenizer.from_dict({"char_to_id": {}})
    bad = json.loads(json.dumps(good))
    bad["special_tokens"]["<PAD>"] = 7
    with pytest.raises(ValueError, match="special_tokens"):
        HybridTokenizer.from_dict(bad)
    bad = json.loads(json.dumps(good))
    bad["word_to_id"]["dog"] = 10**4
    with pytest.raises(ValueError, match=r"not 0\.\."):
        HybridTokenizer.from_dict(bad)
    bad = json.loads(json.dumps(good))
    bad["id_to_char"]["0"] = "Q"
    with pytest.raises(ValueError, match="id_to_char"):
        HybridTokenizer.from_dict(bad)


def test_file_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    again = HybridTokenizer.from_file(tmp_path / "t.json")
    assert again.to_dict() == tok.to_dict()
    assert again.encode(CORPUS) == tok.encode(CORPUS)


# --------------------------------------------------------------------------- properties

_no_eot = lambda t: ENDOFTEXT not in t.lower()  # noqa: E731
# Arbitrary Unicode, with the characters that matter to the rules drawn often.
_pieces = [*SPLIT_CHARS, " ", "\t", "\n", "a", "the", "Z", "é", "\ufffd", "<|endoftext"]
texts = (
    st.lists(st.one_of(st.sampled_from(_pieces), st.characters()), max_size=60)
    .map("".join)
    .filter(_no_eot)
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=texts)
def test_encode_decode_encode_is_stable(tok, small, text):
    for t in (tok, small):
        ids = t.encode(text)
        assert t.encode(t.decode(ids)) == ids
        assert all(0 <= i < t.vocab_size for i in ids)


@SETTINGS
@given(corpus=texts, text=texts, n_words=st.integers(0, 30), n_chars=st.integers(0, 30))
def test_round_trip_with_vocab_from_arbitrary_text(corpus, text, n_words, n_chars):
    t = build_vocab([corpus, text[: len(text) // 2]], n_words=n_words, n_chars=n_chars)
    ids = t.encode(text, bos=False)
    assert t.encode(t.decode(ids), bos=False) == ids


@st.composite
def id_lists(draw, vocab_size: int):
    return draw(
        st.lists(st.one_of(st.sampled_from(range(6)), st.integers(0, vocab_size - 1)), max_size=60)
    )


@SETTINGS
@given(data=st.data())
def test_stream_deltas_concatenate_to_decode(tok, small, data):
    for t in (tok, small):
        ids = data.draw(id_lists(t.vocab_size))
        decoder = t.stream_decoder()
        deltas = [decoder.push(i) for i in ids]
        assert "".join(deltas) == t.decode(ids)
        for i in ids:
            assert isinstance(t.token_text(i), str)


@SETTINGS
@given(corpus=st.lists(texts, max_size=4), n_words=st.integers(0, 50), n_chars=st.integers(0, 50))
def test_build_vocab_properties_and_dict_round_trip(corpus, n_words, n_chars):
    t = build_vocab(corpus, n_words=n_words, n_chars=n_chars)
    d = t.to_dict()
    words = list(d["word_to_id"])[6:]
    distinct = build_vocab(corpus, n_words=10**6, n_chars=10**6)
    counts = _counts(corpus)
    assert len(words) == min(n_words, len(counts))
    assert t.n_chars == min(n_chars, distinct.n_chars)
    assert t.vocab_size == 6 + len(words) + t.n_chars
    assert [(-counts[w], w) for w in words] == sorted((-counts[w], w) for w in words)
    if words:  # the words left out come after the last one kept in (frequency, word) order
        last = (-counts[words[-1]], words[-1])
        assert all((-counts[w], w) > last for w in counts.keys() - set(words))
    assert list(d["char_to_id"]) == sorted(d["char_to_id"])
    again = HybridTokenizer.from_dict(json.loads(json.dumps(d, ensure_ascii=False)))
    assert again.to_dict() == d
    sample = " ".join(corpus)
    assert again.encode(sample) == t.encode(sample)


def _counts(corpus: list[str]) -> dict[str, int]:
    """Word counts the slow, obvious way (the encode splitting rules written out)."""
    counts: dict[str, int] = {}
    for text in corpus:
        for piece in text.lower().split(ENDOFTEXT):
            for c in SPLIT_CHARS:
                piece = piece.replace(c, f" {c} ")
            for w in piece.split():
                if "\ufffd" not in w:
                    counts[w] = counts.get(w, 0) + 1
    return counts


@SETTINGS
@given(text=st.text(max_size=200), ids=st.lists(st.integers(0, 10**4), max_size=40))
def test_nothing_raises(tok, seed_or_tok, text, ids):
    for t in (tok, seed_or_tok):
        t.decode(t.encode(text))
        t.decode([i % t.vocab_size for i in ids])


@pytest.fixture(scope="module")
def seed_or_tok(tok) -> HybridTokenizer:
    return HybridTokenizer.from_file(SEED_VOCAB) if SEED_VOCAB.exists() else tok


# --------------------------------------------------------------------------- the text display mode


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '"Hello," said Tom. "Let\'s play!" Lily smiled: "Yes; I\'d love to!"',
            '"Hello," said tom. "Let\'s play!" lily smiled: "Yes; I\'d love to!"',
        ),
        # a closing quote after ! or ? leaves the speech tag lower case; after . it is a sentence
        ('"hi!" said tom. "ok." they played. i think i\'m happy', None),
        (
            "she said, ' big ' dog's park. a tale' s end",
            "She said, 'big' dog's park. A tale's end",
        ),
        ('the "big" dog<|endoftext|>once upon a time', 'The "big" dog Once upon a time'),
    ],
)
def test_text_mode_reads_as_english(tok, text, expected):
    if expected is None:
        expected = '"Hi!" said tom. "Ok." They played. I think I\'m happy'
    ids = tok.encode(text)
    shown = tok.decode(ids, mode="text")
    assert shown == expected
    assert tok.encode(shown) == tok.encode(tok.decode(ids))  # EOS writes nothing in either mode


def test_text_mode_apostrophe_before_a_spelled_word():
    # "bone" and "sake" are seen once, the five words twice: only those five are words.
    t = build_vocab(["the the dogs dogs ' ' s s t t bone sake"], n_words=5, n_chars=30)
    assert t.decode(t.encode("the dogs' bone"), mode="text") == "The dogs' bone"
    assert t.decode(t.encode("the dogs' sake"), mode="text") == "The dogs'sake"
    assert t.decode(t.encode("the dogs' bone")) == "the dogs'bone"  # plain: unchanged


def test_text_mode_capitalises_only_what_lowercasing_restores():
    t = build_vocab(["ß σ ǆ x"], n_words=0, n_chars=10)  # all spelled
    for word in ("ß", "σ", "ǆ", "x"):
        ids = t.encode(word, bos=False)
        assert t.encode(t.decode(ids, mode="text"), bos=False) == ids
    assert t.decode(t.encode("x"), mode="text") == "X"


def test_unknown_detokenize_mode_is_a_value_error(tok):
    with pytest.raises(ValueError, match="detokenize mode"):
        tok.decode([BOS], mode="fancy")


@SETTINGS
@given(data=st.data())
def test_text_mode_stream_deltas_concatenate_and_differ_only_in_case_and_spaces(tok, small, data):
    for t in (tok, small):
        ids = data.draw(id_lists(t.vocab_size))
        decoder = t.stream_decoder("text")
        deltas = [decoder.push(i) for i in ids]
        shown = t.decode(ids, mode="text")
        assert "".join(deltas) == shown
        plain = t.decode(ids)
        assert shown.lower().replace(" ", "") == plain.lower().replace(" ", "")


@SETTINGS
@given(text=texts)
def test_text_mode_encode_decode_encode_is_stable(tok, small, text):
    for t in (tok, small):
        ids = t.encode(text)
        assert t.encode(t.decode(ids, mode="text")) == ids


def test_text_mode_capitalises_the_word_i_but_not_a_spelled_word_starting_with_i():
    # "i" and "the" are the only words, so "icy" and "ink" are spelled from an "i" character.
    t = build_vocab(["i i the the icy ink saw ."], n_words=2, n_chars=30)
    ids = t.encode("i saw the icy ink. icy ink")
    assert ids[1] < t.n_words and t.encode("icy", bos=False)[1] >= t.n_words  # the premise
    assert t.decode(ids, mode="text") == "I saw the icy ink. Icy ink"


# --------------------------------------------------------------------------- bounded encode


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["the", "dog", "zq", " ", "\n", ".", "'", "<|endoftext|>", "\u00c9"])
        | st.text(max_size=3),
        max_size=30,
    ).map("".join),
    st.integers(0, 40),
    st.booleans(),
    st.booleans(),
)
def test_a_bounded_encode_is_the_full_one_or_raises_exactly_when_it_is_longer(
    tok, text, limit, bos, parse_special
) -> None:
    full = tok.encode(text, bos=bos, parse_special=parse_special)
    if len(full) <= limit:
        assert tok.encode(text, bos=bos, max_tokens=limit, parse_special=parse_special) == full
    else:
        with pytest.raises(TooManyTokensError) as info:
            tok.encode(text, bos=bos, max_tokens=limit, parse_special=parse_special)
        assert info.value.limit == limit


def test_a_bounded_encode_stops_at_the_bound(tok) -> None:
    """The work is bounded by max_tokens, not by the text: a million words, a dozen lookups."""

    class Counting(dict):
        lookups = 0

        def get(self, key, default=None):
            Counting.lookups += 1
            return super().get(key, default)

    fresh = HybridTokenizer.from_dict(tok.to_dict())
    fresh._word_ids = Counting(fresh._word_ids)
    with pytest.raises(TooManyTokensError):
        fresh.encode("the " * 1_000_000, max_tokens=10)
    assert Counting.lookups <= 11


def test_endoftext_is_eos_only_when_special_text_is_parsed(tok) -> None:
    assert EOS in tok.encode("the end<|endoftext|>once")
    plain = tok.encode("the end<|endoftext|>once", parse_special=False)
    assert EOS not in plain
    assert tok.decode(plain).replace(" ", "").startswith("theend")
