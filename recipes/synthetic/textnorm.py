"""Text normalisation for the synthetic corpus: what the TTS engine reads and what the model learns.

Every sentence goes through :func:`prepare_sentence`, which returns two strings that say exactly the
same words:

* the **speakable** text handed to the engine: lower-case words with numbers already spelled out,
  keeping only ``, . ; : ? !`` so the engine still phrases clauses naturally, and
* the **transcript**: the same words in the tokenizer's alphabet (``a-z``, ``'`` and single spaces),
  a fixed point of :func:`asr.tokenizer.normalize_text`.

Why the engine does not get the raw text: espeak-ng and flite expand digits, abbreviations and
acronyms by their own rules ("Dr." -> "doctor" or "drive", "NATO" -> "N A T O" or "nato",
"1990" -> "nineteen ninety" or "one thousand nine hundred ninety"), so the audio would not match a
transcript normalised here. Spelling numbers out ourselves (``num2words``) and rejecting sentences
with abbreviations, acronyms or symbols we cannot spell removes that mismatch instead of guessing
what each engine does.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from num2words import num2words

from asr.tokenizer import normalize_text

__all__ = [
    "TRANSCRIPT_RE",
    "spell_numbers",
    "prepare_sentence",
    "to_transcript",
    "split_clauses",
    "is_valid_transcript",
]

#: A transcript: words of ``a-z`` and ``'`` separated by single spaces, nothing else (no digits:
#: the model's alphabet has none, transcripts spell numbers out).
TRANSCRIPT_RE = re.compile(r"[a-z']+(?: [a-z']+)*")

# --- numbers -------------------------------------------------------------------------------------

_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _words(n: int | float, to: str = "cardinal") -> str:
    """num2words without its hyphens and commas ("forty-five" -> "forty five")."""
    return re.sub(r"[-,]", " ", num2words(n, lang="en", to=to))


def _cardinal(digits: str) -> str:
    """A digit string as words; a leading zero ("007", "0815") is read digit by digit, like people do."""
    digits = digits.replace(",", "")
    if len(digits) > 1 and digits.startswith("0"):
        return " ".join(_DIGIT_WORDS[int(d)] for d in digits)
    return _words(int(digits))


def _plural_words(words: str) -> str:
    """Pluralise the last word of a spelled number ("nineteen eighty" -> "nineteen eighties")."""
    head, _, last = words.rpartition(" ")
    if last.endswith("y"):
        last = last[:-1] + "ies"
    elif last.endswith("x"):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _year_or_cardinal(digits: str) -> str:
    """Four-digit numbers from 1100 to 2099 read as years ("nineteen forty five"), others as cardinals."""
    n = int(digits)
    if len(digits) == 4 and 1100 <= n <= 2099:
        return _words(n, to="year")
    return _cardinal(digits)


def _money(m: re.Match) -> str:
    dollars = int(m.group(1).replace(",", ""))
    text = f"{_words(dollars)} {'dollar' if dollars == 1 else 'dollars'}"
    if m.group(2) and int(m.group(2)):
        cents = int(m.group(2))
        text += f" and {_words(cents)} {'cent' if cents == 1 else 'cents'}"
    return f" {text} "


def _time(m: re.Match) -> str:
    hour, minute = int(m.group(1)), int(m.group(2))
    if minute == 0:
        return f" {_words(hour)} o'clock "
    if minute < 10:
        return f" {_words(hour)} oh {_words(minute)} "
    return f" {_words(hour)} {_words(minute)} "


def _decimal(m: re.Match) -> str:
    whole, frac = m.group(1).replace(",", ""), m.group(2)
    return f" {_words(int(whole))} point {' '.join(_DIGIT_WORDS[int(d)] for d in frac)} "


# Order matters: the specific patterns (money, time, ordinals, decades, decimals, percent) must run
# before the generic integer rule eats their digits.
_NUMBER_RULES: list[tuple[re.Pattern, object]] = [
    (re.compile(r"\$(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d\d))?\b"), _money),
    (re.compile(r"\b(\d{1,2}):(\d\d)\b"), _time),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.I), lambda m: f" {_words(int(m.group(1)), to='ordinal')} "),
    (re.compile(r"\b(\d{4})'?s\b"), lambda m: f" {_plural_words(_year_or_cardinal(m.group(1)))} "),
    (re.compile(r"(?<![\w'])'?(\d0)'?s\b"), lambda m: f" {_plural_words(_words(int(m.group(1))))} "),
    (re.compile(r"\b(\d{1,3}(?:,\d{3})+|\d+)\.(\d+)\b"), _decimal),
    (re.compile(r"\b(\d{1,3}(?:,\d{3})+|\d+)\s?%"), lambda m: f" {_cardinal(m.group(1))} percent "),
    (re.compile(r"\b\d{1,3}(?:,\d{3})+\b"), lambda m: f" {_cardinal(m.group(0))} "),
    (re.compile(r"\b\d+\b"), lambda m: f" {_year_or_cardinal(m.group(0))} "),
]


def spell_numbers(text: str) -> str:
    """Replace every number in ``text`` by words: integers, years, ordinals ("9th"), decades
    ("1980s"), decimals, percentages, dollar amounts and clock times. Other text is untouched
    (spaces may double around replaced numbers; later steps collapse them)."""
    text = text.replace("&", " and ")
    for pattern, repl in _NUMBER_RULES:
        text = pattern.sub(repl, text)  # type: ignore[arg-type]
    return text


# --- sentence checks -------------------------------------------------------------------------------

# "U.S.", "e.g.", "a.m.": letters joined by periods are abbreviations the engines expand their own way.
_DOTTED = re.compile(r"[A-Za-z]\.[A-Za-z]")
_ABBREV = re.compile(
    r"\b(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|gen|col|lt|mt|ft|co|inc|ltd|approx|dept|ave|blvd|rev|prof|capt|sgt|"
    r"esp|cf|viz|ibid|fig|vol|pp|oz|lb|lbs|km|cm|mm|kg|hr|hrs|min|sec|jan|feb|mar|apr|jun|jul|aug|sep|sept|"
    r"oct|nov|dec)\.",
    re.I,
)
# Two or more capitals in a row: an acronym ("NATO", "TV") or a Roman numeral ("II").
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")
# What may reach the engine after numbers are spelled: letters, apostrophes, word separators, and
# the punctuation that shapes prosody. Anything else (#, @, +, =, °, "/" as in "120/80" or
# phonetic "/s/", brackets...) rejects the sentence.
_ALLOWED = re.compile(r"[A-Za-z' .,;:?!\-\"()\u2013\u2014\u201c\u201d]*")
_SEPARATORS = re.compile(r"[-\u2013\u2014/()\"\u201c\u201d]+")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:?!])")
_REPEATED_PUNCT = re.compile(r"([.,;:?!])[.,;:?!]+")
_VOWEL = re.compile(r"[aeiouy]")


# Quoted words: WordNet writes `word' (backtick, apostrophe); others write 'word'. The quote marks
# must go, or the closing one would stay glued to the word ("score'") like a plural possessive.
_BACKTICK_QUOTE = re.compile(r"`([^`']*)'")
_SINGLE_QUOTE = re.compile(r"(?<![A-Za-z0-9])'([^']+)'(?![A-Za-z0-9])")


def _fold(text: str) -> str:
    """Accented letters to ASCII ("café" -> "cafe"), typographic apostrophes to "'", quote marks
    around words removed (apostrophes inside words, "don't", "boys'", stay)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = _BACKTICK_QUOTE.sub(r"\1", text)
    return _SINGLE_QUOTE.sub(r"\1", text)


def to_transcript(speakable: str) -> str:
    """The transcript of a speakable string: the tokenizer's normalisation (punctuation dropped)."""
    return normalize_text(speakable)


def is_valid_transcript(text: str) -> bool:
    """True for a non-empty transcript in the model alphabet that ``normalize_text`` leaves unchanged."""
    return bool(TRANSCRIPT_RE.fullmatch(text)) and normalize_text(text) == text


def prepare_sentence(raw: str, lowercase_caps: bool = False) -> tuple[str, str] | None:
    """Turn one raw sentence into ``(speakable, transcript)``, or None when it cannot be read
    unambiguously (abbreviation, acronym, unspellable symbol, consonant-only token like "hmm").

    ``lowercase_caps`` lower-cases all-capital words instead of rejecting them; the KJV prints
    "LORD" and "GOD" in capitals, which are ordinary words, not acronyms.
    """
    text = _fold(raw).strip()
    if not text or _DOTTED.search(text) or _ABBREV.search(text):
        return None
    if lowercase_caps:
        text = _ACRONYM.sub(lambda m: m.group(0).lower(), text)
    elif _ACRONYM.search(text):
        return None
    text = spell_numbers(text)
    if not _ALLOWED.fullmatch(text):
        return None
    text = _SEPARATORS.sub(" ", text).lower()
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text).strip(" ,;:")
    transcript = to_transcript(text)
    if not transcript or not is_valid_transcript(transcript):
        return None
    for word in transcript.split():
        letters = word.replace("'", "")
        # "mr", "hmm", "nth": no vowel means an abbreviation or an interjection that engines spell
        # out letter by letter. Single letters ("a", "i", "o", "x") are fine: engines say their name.
        if not letters or (len(letters) > 1 and not _VOWEL.search(letters)):
            return None
    return text, transcript


# --- clause splitting --------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")
_COMMA = re.compile(r"(?<=,)\s+")


def _word_count(text: str) -> int:
    return len(text.split())


def _merge_short(pieces: list[str], min_words: int, max_words: int) -> list[str]:
    """Glue pieces shorter than ``min_words`` to a neighbour, as long as the result stays <= max_words."""
    out: list[str] = []
    for piece in pieces:
        if out and (_word_count(out[-1]) < min_words or _word_count(piece) < min_words) \
                and _word_count(out[-1]) + _word_count(piece) <= max_words:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def _pack(parts: list[str], max_words: int) -> list[str]:
    """Greedily join consecutive comma-separated parts while the result has at most ``max_words``
    words, so a long verse becomes a few long clauses rather than many short fragments."""
    out: list[str] = []
    for part in parts:
        if out and _word_count(out[-1]) + _word_count(part) <= max_words:
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return out


def _split_words(text: str, max_words: int) -> list[str]:
    """Cut a clause without punctuation into near-equal runs of at most ``max_words`` words."""
    words = text.split()
    n = -(-len(words) // max_words)
    size = -(-len(words) // n)
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def split_clauses(text: str, min_words: int = 3, max_words: int = 20) -> list[str]:
    """Split a long passage (a Bible verse) into clauses of ``min_words``..``max_words`` words.

    Cuts at sentence punctuation (``. ; : ? !``) first; a sentence still too long is cut at commas
    (consecutive comma parts packed greedily up to ``max_words``), then between words. Short pieces are merged with a neighbour; a passage shorter than
    ``min_words`` altogether is dropped (returns []), because two-word fragments of archaic prose
    teach little and sound unnatural when synthesised alone.
    """
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        if not sentence:
            continue
        if _word_count(sentence) <= max_words:
            pieces.append(sentence)
            continue
        for part in _pack(_COMMA.split(sentence), max_words):
            pieces.extend([part] if _word_count(part) <= max_words else _split_words(part, max_words))
    pieces = _merge_short(pieces, min_words, max_words)
    return [p for p in pieces if min_words <= _word_count(p) <= max_words]


def unique(items: Iterable[str]) -> list[str]:
    """Items in first-seen order without duplicates."""
    return list(dict.fromkeys(items))
