"""HybridTokenizer: the seed's word + character tokenizer, in its vocabulary file format.

Known words are one id each; any other word is spelled with character ids between
``<CHAR_START>`` and ``<CHAR_END>``, so no text is out of vocabulary (a character outside the
character vocabulary becomes ``<UNK>``). The JSON format is the original project's
(``tinystories_tokenizer_vocab.json``), so its vocabulary and weights load unchanged and what we
write it can read back:

- ``word_to_id`` / ``id_to_word`` (string keys): ids ``0..W-1``, six specials first
  (``<PAD>`` 0, ``<UNK>`` 1, ``<BOS>`` 2, ``<EOS>`` 3, ``<CHAR_START>`` 4, ``<CHAR_END>`` 5), then
  the words by frequency;
- ``char_to_id`` / ``id_to_char``: ids ``0..C-1``; a character's *token* id is
  ``char_to_id[c] + W``;
- ``vocab_size``: the number of words that were asked for (3200 in the seed), *not* the model's
  vocabulary, which is ``W + C`` (3206 + 60 = 3266) and is :attr:`HybridTokenizer.vocab_size` here;
- ``special_tokens``.

Differences from the original, on purpose:

- ``encode`` never appends ``<EOS>``. The original ended every prompt with it, which tells the
  model the story is over, so it started a new one instead of continuing the prompt.
- ``decode`` reads like text (see :class:`StreamDecoder` for the spacing rules) instead of putting a
  space before every token, and rebuilds character-spelled words instead of dropping them.
- ``decode`` is streaming-exact: the text deltas a :class:`StreamDecoder` returns token by token
  concatenate to exactly ``decode(ids)`` for any id sequence, because ``decode`` *is* a stream
  decoder run to the end (one implementation, not two that could drift apart).
"""

from __future__ import annotations

import json
import operator
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BOS",
    "CHAR_END",
    "CHAR_START",
    "DETOKENIZE_MODES",
    "ENDOFTEXT",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "SPLIT_CHARS",
    "UNK",
    "HybridTokenizer",
    "StreamDecoder",
    "TooManyTokensError",
    "build_vocab",
]

PAD, UNK, BOS, EOS, CHAR_START, CHAR_END = 0, 1, 2, 3, 4, 5
SPECIAL_TOKENS: dict[str, int] = {
    "<PAD>": PAD,
    "<UNK>": UNK,
    "<BOS>": BOS,
    "<EOS>": EOS,
    "<CHAR_START>": CHAR_START,
    "<CHAR_END>": CHAR_END,
}
_N_SPECIAL = len(SPECIAL_TOKENS)

#: The literal that encodes to ``<EOS>`` (TinyStories' story separator).
ENDOFTEXT = "<|endoftext|>"
#: Every one of these characters is split off as its own token by ``encode``.
SPLIT_CHARS = ".,!?;:\"'-()[]{}"
#: What ``decode`` writes for ``<UNK>`` (U+FFFD REPLACEMENT CHARACTER).
REPLACEMENT = "\ufffd"

# One str.translate pass puts spaces around the split characters; str.split() then does the rest.
_SPACE_OUT = str.maketrans({c: f" {c} " for c in SPLIT_CHARS})

# Token kinds for the decoder's spacing rules.
_START = 0  # nothing written yet
_WORD = 1
_OPEN = 2  # ( [ {  and an opening "
_CLOSE = 3  # . , ! ? ; : ) ] }  and a closing "
_JOIN = 4  # ' and -
_QUOTE = 5  # " before we know whether it opens or closes
_PUNCT_KIND = {c: _CLOSE for c in ".,!?;:)]}"} | {c: _OPEN for c in "([{"}
_PUNCT_KIND |= {"'": _JOIN, "-": _JOIN, '"': _QUOTE}

#: ``plain``: the original's lowercase text with the spacing rules; ``text``: the same tokens
#: shown as people write them (sentence case, "I", English apostrophes). See StreamDecoder.
DETOKENIZE_MODES = ("plain", "text")
# What follows an apostrophe inside a word; any other word after a word's ' is a new word.
_CONTRACTIONS = frozenset({"s", "t", "m", "d", "re", "ll", "ve", "clock"})
# A spelled word shows only its first character when the choice is made.
_CONTRACTION_STARTS = frozenset(w[0] for w in _CONTRACTIONS)
_SENTENCE_END = frozenset(".!?")


def _capital(text: str) -> str:
    """``text`` with its first character upper-cased, where lowercasing gives it back exactly
    (so encode, which lowercases, cannot tell); final-sigma contexts are left alone."""
    first = text[:1]
    upper = first.upper()
    if first == "\u03c3" or upper == first or upper.lower() != first:
        return text
    return upper + text[1:]


def _space_before(prev: int, cur: int) -> bool:
    """Whether a token of kind ``cur`` written after one of kind ``prev`` gets a space first."""
    if prev in (_START, _OPEN, _JOIN):
        return False
    if cur == _CLOSE:
        return False
    return not (cur == _JOIN and prev == _WORD)


class StreamDecoder:
    """Turns token ids into text one id at a time; ``push`` returns the new text.

    ``"".join(d.push(i) for i in ids) == tokenizer.decode(ids)`` for every id sequence, malformed
    ones included, because ``decode`` runs this same decoder. No text is held back: a spelled
    word's characters appear as they arrive.

    Spacing (decided when a token's first character is written, from the kind of the previous
    written token and of this one, plus one bit of state for double quotes):

    - words are separated by one space; nothing is written before the first token;
    - no space before ``. , ! ? ; : ) ] }``; no space after ``( [ {``;
    - ``'`` and ``-`` join: no space before them after a word, never a space after them, so
      ``it ' s`` -> ``it's`` and ``well - known`` -> ``well-known`` (a quoting ``'`` therefore
      glues to its neighbours, a trade for readable contractions, which are far more common);
    - ``"`` alternates between opening (space before, none after) and closing (no space before),
      so ``" hi , " said tom`` -> ``"hi," said tom``. The parity resets at ``<BOS>`` / ``<EOS>``
      (a new story). This uses the quote count so far, still a function of the prefix only, so
      streaming stays exact;
    - a character-spelled word takes the kind of its first character (``CHAR_START ( CHAR_END``
      behaves like the word ``(``), else it is a word;
    - the spacing only changes whitespace between tokens, and only next to a split character, so
      ``encode(decode(encode(t))) == encode(t)``.

    ``mode="text"`` (what ``serve`` and ``generate`` show by default) is a display layer over
    these rules, still a function of the prefix only, so streaming stays exact:

    - sentence case: the first word of the text, of a story (after ``<BOS>`` / ``<EOS>``), after
      ``. ! ?`` and after an opening ``"`` that does not follow a word (``said, "Let's``, but
      ``the "big" dog``) gets a capital; a closing ``"`` after ``!`` or ``?`` cancels it
      (``"wow!" said tom``), after ``.`` it stands. The word ``i`` is always ``I``
      (so ``i'm`` -> ``I'm``);
    - apostrophes: a ``'`` glued to a word stays glued to a contraction's ending
      (``s t m d re ll ve``, and ``clock``; for a spelled word, its first letter decides), and any
      other word after it gets a space, so
      ``dogs' bone`` and ``'hi' she said`` read as English while ``it's`` stays whole;
    - only case and whitespace next to split characters change, and only where lowercasing gives
      the character back, so ``encode(decode(ids, mode="text")) == encode(decode(ids))``.

    Ids: ``<PAD>`` is ignored; ``<BOS>`` / ``<EOS>`` write nothing and end a spelled word;
    ``<CHAR_START>`` starts a spelled word (ending an unclosed one); ``<CHAR_END>`` ends it (a stray
    one is ignored); a character id outside a spelled word starts one implicitly, so consecutive
    stray characters form one word; a word id ends an unclosed spelled word; ``<UNK>`` is written
    as U+FFFD, as a character inside a spelled word and as a word outside one. An id outside
    ``[0, vocab_size)`` raises ValueError and leaves the decoder unchanged.
    """

    __slots__ = (
        "_apostrophe",
        "_capital",
        "_in_word",
        "_last",
        "_n_words",
        "_prev",
        "_quote_open",
        "_text_mode",
        "_texts",
        "_word_started",
    )

    def __init__(self, tokenizer: HybridTokenizer, mode: str = "plain") -> None:
        if mode not in DETOKENIZE_MODES:
            raise ValueError(f"detokenize mode must be one of {DETOKENIZE_MODES}, got {mode!r}")
        self._texts = tokenizer._texts  # display text per id: words, then characters
        self._n_words = tokenizer.n_words  # the first character id
        self._prev = _START
        self._in_word = False  # inside a spelled word
        self._word_started = False  # ... and it has written its first character
        self._quote_open = False
        self._text_mode = mode == "text"
        self._capital = True  # text mode: the next word starts a sentence
        self._apostrophe = False  # text mode: the last token was a ' glued to a word
        self._last = ""  # text mode: the last token written

    def push(self, token_id: int) -> str:
        tid = _check_id(token_id, len(self._texts))
        if tid >= _N_SPECIAL:  # a word or a character
            if tid < self._n_words:
                self._in_word = False
                return self._write(self._texts[tid])
            if not self._in_word:
                self._in_word, self._word_started = True, False
            return self._write_char(self._texts[tid])
        if tid == UNK:
            if self._in_word:
                return self._write_char(REPLACEMENT)
            return self._write(REPLACEMENT)
        if tid == CHAR_START:
            self._in_word, self._word_started = True, False
        elif tid == CHAR_END:
            self._in_word = False
        elif tid in (BOS, EOS):
            self._in_word = False
            self._quote_open = False
            self._capital = True
        return ""  # PAD, BOS, EOS and the markers write nothing

    def _write_char(self, ch: str) -> str:
        if self._word_started:
            return ch
        self._word_started = True
        return self._write(ch)

    def _write(self, text: str) -> str:
        kind = _PUNCT_KIND.get(text, _WORD)
        if kind == _QUOTE:
            kind = _CLOSE if self._quote_open else _OPEN
            self._quote_open = not self._quote_open
        space = _space_before(self._prev, kind)
        if self._text_mode:
            text, space = self._display(text, kind, space)
        self._prev = kind
        return " " + text if space else text

    def _display(self, text: str, kind: int, space: bool) -> tuple[str, bool]:
        """Text mode: the case of ``text`` and whether a word after a ' gets its space back."""
        last, self._last = self._last, text
        after_apostrophe, self._apostrophe = self._apostrophe, False
        if kind == _WORD:
            if after_apostrophe and (
                text[0] not in _CONTRACTION_STARTS if self._in_word else text not in _CONTRACTIONS
            ):
                space = True
            if text == "i" and not self._in_word:  # the word, not a spelled word's first letter
                text = "I"
            elif self._capital:
                text = _capital(text)
            self._capital = False
        elif text in _SENTENCE_END:
            self._capital = True
        elif text == '"':
            if kind == _OPEN:
                self._capital = self._capital or self._prev != _WORD
            elif last in ("!", "?"):
                self._capital = False
        elif text == "'":
            self._apostrophe = self._prev == _WORD
        return text, space


class TooManyTokensError(ValueError):
    """``encode(..., max_tokens=N)`` stopped: the text makes more than ``limit`` tokens."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the text makes more than {limit} tokens")
        self.limit = limit


def _check_id(token_id: int, vocab_size: int) -> int:
    try:
        tid = operator.index(token_id)
    except TypeError:
        raise ValueError(f"token id must be an integer, got {token_id!r}") from None
    if not 0 <= tid < vocab_size:
        raise ValueError(f"token id {tid} is out of range [0, {vocab_size})")
    return tid


class HybridTokenizer:
    """Words plus characters; see the module docstring for the format and rules.

    Attributes: ``n_words`` (W, specials included), ``n_chars``, ``vocab_size`` (W + n_chars, the
    model's vocabulary), ``words_requested`` (the file's ``vocab_size`` field).
    """

    def __init__(
        self,
        words: Iterable[str],
        chars: Iterable[str],
        *,
        words_requested: int | None = None,
    ) -> None:
        """``words``: the non-special words in id order (ids 6, 7, ...); ``chars``: the characters
        in id order. Raises ValueError for duplicates or a character that is not one code point.
        """
        words = list(words)
        chars = list(chars)
        all_words = list(SPECIAL_TOKENS) + words
        if len(set(all_words)) != len(all_words):
            dup = next(w for w, n in Counter(all_words).items() if n > 1)
            raise ValueError(f"duplicate word in vocabulary: {dup!r}")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"a vocabulary character must be one code point, got {c!r}")
        if len(set(chars)) != len(chars):
            dup = next(c for c, n in Counter(chars).items() if n > 1)
            raise ValueError(f"duplicate character in vocabulary: {dup!r}")
        self._words = all_words
        self._chars = chars
        self.n_words = len(all_words)
        self.n_chars = len(chars)
        self.vocab_size = self.n_words + self.n_chars
        self.words_requested = len(words) if words_requested is None else int(words_requested)
        # encode: the special names are not words a text can produce (the text is lowercased and
        # "<PAD>" is upper case anyway), so leave them out of the lookup.
        self._word_ids = {w: i for i, w in enumerate(all_words) if i >= _N_SPECIAL}
        self._char_ids = {c: self.n_words + i for i, c in enumerate(chars)}
        self._texts = all_words + chars  # display text of every word / character id
        self._spelled: dict[str, list[int]] = {}  # cache of spelled unknown words

    # ----------------------------------------------------------------------- file format

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HybridTokenizer:
        """Read the seed's JSON structure; ValueError says what is wrong with it."""
        for key in ("word_to_id", "char_to_id"):
            if not isinstance(d.get(key), Mapping):
                raise ValueError(f"tokenizer vocabulary: missing or invalid {key!r}")
        specials = d.get("special_tokens", SPECIAL_TOKENS)
        if dict(specials) != SPECIAL_TOKENS:
            raise ValueError(
                f"tokenizer vocabulary: special_tokens must be {SPECIAL_TOKENS}, got {specials}"
            )
        words = _ordered(d["word_to_id"], "word_to_id")
        if words[:_N_SPECIAL] != list(SPECIAL_TOKENS):
            raise ValueError("tokenizer vocabulary: ids 0-5 of word_to_id must be the specials")
        chars = _ordered(d["char_to_id"], "char_to_id")
        for key, expected in (("id_to_word", words), ("id_to_char", chars)):
            inverse = d.get(key)
            if inverse is not None and {int(k): v for k, v in inverse.items()} != dict(
                enumerate(expected)
            ):
                raise ValueError(f"tokenizer vocabulary: {key!r} is not the inverse of its map")
        requested = d.get("vocab_size", len(words) - _N_SPECIAL)
        return cls(words[_N_SPECIAL:], chars, words_requested=requested)

    @classmethod
    def from_file(cls, path: str | Path) -> HybridTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The seed's structure, keys in its order, so the original project reads it back."""
        return {
            "word_to_id": {w: i for i, w in enumerate(self._words)},
            "id_to_word": {str(i): w for i, w in enumerate(self._words)},
            "char_to_id": {c: i for i, c in enumerate(self._chars)},
            "id_to_char": {str(i): c for i, c in enumerate(self._chars)},
            "vocab_size": self.words_requested,
            "special_tokens": dict(SPECIAL_TOKENS),
        }

    def save(self, path: str | Path) -> None:
        """Write JSON as the seed file is written (indent 2, UTF-8, non-ASCII kept)."""
        Path(path).write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8"
        )

    # ----------------------------------------------------------------------- encode / decode

    def encode(
        self,
        text: str,
        *,
        bos: bool = True,
        max_tokens: int | None = None,
        parse_special: bool = True,
    ) -> list[int]:
        """Text -> ids: ``<BOS>`` first when ``bos``; lowercased; ``<|endoftext|>`` -> ``<EOS>``
        (with ``parse_special``; without it, the literal is a word like any other, spelled with
        character ids); each of ``. , ! ? ; : " ' - ( ) [ ] { }`` its own token; split on
        whitespace; a known word is its id, another word ``<CHAR_START>``, its character ids
        (``<UNK>`` for a character not in the vocabulary), ``<CHAR_END>``.

        ``max_tokens``: raise :class:`TooManyTokensError` as soon as the ids would number more,
        without encoding the rest, so the work is bounded by what the caller can use (a prompt
        that cannot fit the context costs that much and no more); below the bound the result is
        exactly the unbounded one.

        Unlike the original, no ``<EOS>`` is appended: a prompt is text to continue, not a
        finished story.
        """
        ids = [BOS] if bos else []
        lowered = text.lower()
        pieces = lowered.split(ENDOFTEXT) if parse_special else [lowered]
        word_ids = self._word_ids
        limit = sys.maxsize if max_tokens is None else max_tokens
        for n, piece in enumerate(pieces):
            if n:
                ids.append(EOS)
            for word in piece.translate(_SPACE_OUT).split():
                wid = word_ids.get(word)
                if wid is not None:
                    ids.append(wid)
                else:
                    ids.extend(self._spell(word))
                if len(ids) > limit:
                    raise TooManyTokensError(limit)
        if len(ids) > limit:  # an <EOS> last
            raise TooManyTokensError(limit)
        return ids

    def _spell(self, word: str) -> list[int]:
        spelled = self._spelled.get(word)
        if spelled is None:
            get = self._char_ids.get
            spelled = [CHAR_START, *(get(c, UNK) for c in word), CHAR_END]
            if len(self._spelled) < 65536:  # bound the cache; prompts can be anything
                self._spelled[word] = spelled
        return spelled

    def stream_decoder(self, mode: str = "plain") -> StreamDecoder:
        """A fresh decoder; see :class:`StreamDecoder` for the rules and the modes."""
        return StreamDecoder(self, mode)

    def decode(self, ids: Iterable[int], mode: str = "plain") -> str:
        """Ids -> readable text, exactly the concatenated deltas of a :class:`StreamDecoder`.

        ``mode`` is ``plain`` (the original's lowercase form) or ``text`` (sentence case,
        "I", English apostrophes; a display layer that ``encode`` cannot tell apart). Raises
        ValueError for an id outside ``[0, vocab_size)`` or an unknown mode.
        """
        push = self.stream_decoder(mode).push
        return "".join([push(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        """Display text of one id (logprobs, tokenize): the word or character itself, U+FFFD for
        ``<UNK>``, and the name (``<PAD>``, ``<BOS>``, ``<EOS>``, ``<CHAR_START>``,
        ``<CHAR_END>``) for the other specials. ValueError when out of range.
        """
        tid = _check_id(token_id, self.vocab_size)
        if tid == UNK:
            return REPLACEMENT
        return self._texts[tid]

    def __repr__(self) -> str:
        return f"HybridTokenizer(n_words={self.n_words}, n_chars={self.n_chars})"


def _ordered(mapping: Mapping[str, Any], key: str) -> list[str]:
    """The keys of a ``{token: id}`` map in id order; the ids must be exactly 0..n-1."""
    by_id: dict[int, str] = {}
    for token, i in mapping.items():
        if not isinstance(i, int) or isinstance(i, bool) or i in by_id:
            raise ValueError(f"tokenizer vocabulary: {key}[{token!r}] = {i!r} is not a unique int")
        by_id[i] = token
    if set(by_id) != set(range(len(by_id))):
        raise ValueError(f"tokenizer vocabulary: the ids of {key} are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def build_vocab(texts: Iterable[str], n_words: int = 3200, n_chars: int = 60) -> HybridTokenizer:
    """Build a vocabulary from a corpus, split into words exactly as ``encode`` splits.

    Ids: the 6 specials, then the ``n_words`` most frequent words (most frequent first, ties in
    code point order of the word), then the ``n_chars`` most frequent characters of the words
    (counted over every occurrence; the chosen ones get ids in code point order, as in the seed).
    A corpus with fewer distinct words or characters gets all of them, so the vocabulary is then
    smaller than ``6 + n_words + n_chars``; the file's ``vocab_size`` field still records
    ``n_words`` (the number asked for), as the original does. ``<|endoftext|>`` separators are not
    counted. Words and characters containing U+FFFD are left out: ``decode`` writes ``<UNK>`` as
    U+FFFD, and keeping it distinct is what makes ``encode(decode(encode(t))) == encode(t)``.
    """
    if n_words < 0 or n_chars < 0:
        raise ValueError("n_words and n_chars must be >= 0")
    word_counts: Counter[str] = Counter()
    for text in texts:
        for piece in text.lower().split(ENDOFTEXT):
            word_counts.update(piece.translate(_SPACE_OUT).split())
    char_counts: Counter[str] = Counter()
    for word, n in word_counts.items():
        for c, k in Counter(word).items():
            char_counts[c] += n * k
    for counts in (word_counts, char_counts):
        for token in [t for t in counts if REPLACEMENT in t]:
            del counts[token]

    def by_frequency(counts: Counter[str], n: int) -> list[str]:
        return sorted(counts, key=lambda t: (-counts[t], t))[:n]

    words = by_frequency(word_counts, n_words)
    chars = sorted(by_frequency(char_counts, n_chars))
    return HybridTokenizer(words, chars, words_requested=n_words)
