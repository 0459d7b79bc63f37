"""Sentence sources for the synthetic corpus, each yielding raw English text for :mod:`textnorm`.

* ``kjv``: the King James Bible from Debian's ``bible-kjv-text`` (public domain), read through the
  ``bible`` program of ``bible-kjv`` because the package stores the text in its own compressed
  format (``/usr/lib/bible.data``). Verse numbers are dropped and verses split into clauses.
* ``wordnet``: the quoted usage examples of WordNet 3.0 (Debian ``wordnet-base``,
  ``/usr/share/wordnet/data.*``): short modern sentences with a very wide vocabulary.
* ``commands``: generated everyday commands and questions (lights, timers, calls, directions), so
  the model hears the short imperative speech an out-of-the-box recogniser gets.
* ``librispeech`` (opt-in): LibriSpeech's training transcripts (``../shared/data/text``, public-domain
  books), one utterance per line, cut into pieces of at most :data:`MAX_BOOK_WORDS` words so that a
  robotic voice reads each within the corpus's length limit. Natural modern read English.
* ``numbers``: generated digit strings, counts, prices, times, dates and years, so every number word
  is frequent (the archaic and literary sources rarely say "forty two" or "oh five").

The generators are seeded ``random.Random`` instances, so the corpus is reproducible.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

from asr.tokenizer import TextFileError, read_text_lines

WORDNET_DIR = Path("/usr/share/wordnet")
KJV_RANGE = "gen1:1-rev22:21"
#: Longest piece of a LibriSpeech line read as one utterance (a line averages 33 words).
MAX_BOOK_WORDS = 20

_VERSE = re.compile(r"^\s*\d+\s+(\S.*)$")
# In a WordNet data line the gloss follows "| "; usage examples are the double-quoted parts of it.
_QUOTED = re.compile(r'"([^"]+)"')


class SourceError(RuntimeError):
    """A text source (Debian package) is missing; the message says which package to install."""


def kjv_verses(text_file: Path | None = None) -> list[str]:
    """All verses of the KJV without their numbers, from ``text_file`` (output of ``bible``) or by
    running ``bible -l100000 gen1:1-rev22:21`` (one verse per line, no wrapping)."""
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    else:
        exe = shutil.which("bible")
        if exe is None:
            raise SourceError("the 'bible' program is missing: apt-get install bible-kjv bible-kjv-text")
        text = subprocess.run([exe, "-l100000", KJV_RANGE], check=True, capture_output=True,
                              text=True, errors="replace").stdout
    verses = []
    for line in text.splitlines():
        m = _VERSE.match(line)
        if m:  # chapter headings ("Genesis 1") and blank lines do not match
            verses.append(m.group(1).strip())
    return verses


def wordnet_examples(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """The quoted usage examples from WordNet's ``data.noun/verb/adj/adv``, in file order, deduplicated."""
    files = [wordnet_dir / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise SourceError(f"WordNet data files not found in {wordnet_dir}: apt-get install wordnet-base")
    seen: dict[str, None] = {}
    for f in files:
        with open(f, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:  # license header lines start with spaces
                    continue
                gloss = line.split("|", 1)[1]
                for ex in _QUOTED.findall(gloss):
                    ex = ex.strip()
                    if ex:
                        seen.setdefault(ex, None)
    return list(seen)


def book_pieces(text_file: Path, rng: random.Random, skip_line=lambda line: False,
                max_words: int = MAX_BOOK_WORDS) -> list[str]:
    """Lines of ``text_file`` (plain or ``.xz``: one normalised transcript per line) for which
    ``skip_line`` is false, each cut at word boundaries into pieces of 6 to ``max_words`` words drawn
    from ``rng`` (a line that short stays whole), in file order. Skip whole lines, not pieces, to
    keep a held-out transcript out: its pieces would not match it."""
    try:
        lines = read_text_lines(text_file)
    except TextFileError as e:
        raise SourceError(f"cannot read the LibriSpeech text: {e}") from None
    pieces = []
    for line in lines:
        if skip_line(line):
            continue
        words = line.split()
        while words:
            n = len(words) if len(words) <= max_words else rng.randint(6, max_words)
            if len(words) - n < 6 and len(words) > max_words:
                n = len(words) - 6  # no stub of a few words at the end
            pieces.append(" ".join(words[:n]))
            words = words[n:]
    return pieces


# --- generated everyday speech --------------------------------------------------------------------

_NAMES = ["anna", "ben", "carlos", "diana", "emma", "frank", "grace", "henry", "isabel", "jack", "kate",
          "liam", "maria", "noah", "olivia", "peter", "rachel", "sam", "tom", "victoria", "william", "zoe",
          "mom", "dad", "grandma", "the office", "the doctor", "my brother", "my sister", "the school"]
_ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "hallway", "garage", "office", "basement",
          "dining room", "garden", "kids room", "attic"]
_DEVICES = ["lights", "lamp", "fan", "heater", "radio", "television", "air conditioner", "coffee maker",
            "dishwasher", "oven", "printer", "computer", "alarm", "music"]
_PLACES = ["the station", "the airport", "the nearest pharmacy", "the hospital", "the library", "home",
           "work", "the city center", "the beach", "the museum", "the supermarket", "the post office",
           "the bank", "a gas station", "the park", "the hotel", "the university", "downtown"]
_CITIES = ["london", "paris", "berlin", "chicago", "boston", "seattle", "madrid", "rome", "tokyo",
           "toronto", "sydney", "dublin", "denver", "new york", "san francisco", "amsterdam", "cairo"]
_ITEMS = ["milk", "bread", "eggs", "butter", "apples", "coffee", "rice", "cheese", "tomatoes",
          "batteries", "soap", "orange juice", "chicken", "pasta", "onions", "bananas", "paper towels"]
_GENRES = ["jazz", "classical", "rock", "pop", "country", "blues", "folk", "relaxing", "dance"]
_TASKS = ["call the dentist", "buy a present", "water the plants", "pay the rent", "take out the trash",
          "feed the cat", "walk the dog", "send the report", "book a table", "check the mail",
          "pick up the kids", "renew my passport", "charge my phone", "lock the door"]
_WHEN = ["tomorrow morning", "tonight", "this afternoon", "next week", "on monday", "on friday",
         "in an hour", "after lunch", "before dinner", "at noon", "on the weekend", "later today"]
_DIRECTIONS = ["left", "right", "forward", "back", "up", "down", "north", "south", "east", "west"]
_UNITS = ["meters", "steps", "feet", "miles", "kilometers", "yards", "blocks"]
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december"]
_SHORT = ["yes", "no", "okay", "stop", "cancel", "go back", "next", "previous", "repeat that",
          "thank you", "never mind", "help", "pause", "continue", "start over", "yes please",
          "no thanks", "sounds good", "not now", "what did you say", "i don't know", "that's right",
          "that's wrong", "hello", "good morning", "good night", "see you later", "excuse me"]


def _n(rng: random.Random, lo: int, hi: int) -> str:
    """A random integer as digits; :func:`textnorm.spell_numbers` spells it, as it would real text."""
    return str(rng.randint(lo, hi))


def _time_of_day(rng: random.Random) -> str:
    return f"{rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45', f'{rng.randint(0, 59):02d}'])}"


_COMMAND_TEMPLATES = [
    lambda r: f"turn {r.choice(['on', 'off'])} the {r.choice(_DEVICES)}",
    lambda r: f"turn {r.choice(['on', 'off'])} the {r.choice(_DEVICES)} in the {r.choice(_ROOMS)}",
    lambda r: f"switch {r.choice(['on', 'off'])} the {r.choice(_ROOMS)} {r.choice(['lights', 'lamp', 'heater'])}",
    lambda r: f"dim the lights in the {r.choice(_ROOMS)} to {_n(r, 5, 95)} percent",
    lambda r: f"set the temperature to {_n(r, 15, 28)} degrees",
    lambda r: f"set a timer for {_n(r, 1, 90)} {r.choice(['minutes', 'seconds', 'hours'])}",
    lambda r: f"set an alarm for {_time_of_day(r)} {r.choice(['', 'tomorrow', 'on ' + r.choice(_WEEKDAYS)])}",
    lambda r: f"wake me up at {_time_of_day(r)}",
    lambda r: f"call {r.choice(_NAMES)}",
    lambda r: f"call {r.choice(_NAMES)} on {r.choice(['speaker', 'the mobile', 'video'])}",
    lambda r: f"send a message to {r.choice(_NAMES)} saying i will be {_n(r, 5, 40)} minutes late",
    lambda r: f"text {r.choice(_NAMES)} that i am on my way",
    lambda r: f"play some {r.choice(_GENRES)} music",
    lambda r: "play the next song",
    lambda r: f"turn the volume {r.choice(['up', 'down'])}",
    lambda r: f"set the volume to {_n(r, 1, 10)}",
    lambda r: f"what is the weather like {r.choice(['today', 'tomorrow', 'this weekend'])} in {r.choice(_CITIES)}",
    lambda r: f"will it rain in {r.choice(_CITIES)} {r.choice(_WHEN)}",
    lambda r: f"remind me to {r.choice(_TASKS)} {r.choice(_WHEN)}",
    lambda r: f"add {r.choice(_ITEMS)} to my shopping list",
    lambda r: f"add {_n(r, 2, 12)} {r.choice(_ITEMS)} and some {r.choice(_ITEMS)} to the list",
    lambda r: f"how far is it to {r.choice(_PLACES)}",
    lambda r: f"navigate to {r.choice(_PLACES)}",
    lambda r: f"take me to {r.choice(_PLACES)} please",
    lambda r: f"{r.choice(['move', 'go', 'walk', 'drive'])} {r.choice(_DIRECTIONS)} {_n(r, 2, 500)} {r.choice(_UNITS)}",
    lambda r: f"turn {r.choice(['left', 'right'])} at the {r.choice(['next', 'second', 'third'])} {r.choice(['corner', 'light', 'street', 'exit'])}",
    lambda r: f"open the {r.choice(['door', 'window', 'garage', 'curtains', 'blinds', 'file', 'calendar'])}",
    lambda r: f"close the {r.choice(['door', 'window', 'garage', 'curtains', 'blinds', 'app'])}",
    lambda r: f"what time is it in {r.choice(_CITIES)}",
    lambda r: f"what is on my calendar {r.choice(_WHEN)}",
    lambda r: f"schedule a meeting with {r.choice(_NAMES)} on {r.choice(_WEEKDAYS)} at {_time_of_day(r)}",
    lambda r: f"book a table for {_n(r, 2, 8)} at {_time_of_day(r)}",
    lambda r: f"how much is {_n(r, 2, 99)} times {_n(r, 2, 99)}",
    lambda r: f"what is {_n(r, 2, 999)} plus {_n(r, 2, 999)}",
    lambda r: f"convert {_n(r, 2, 500)} {r.choice(['miles', 'pounds', 'dollars', 'feet'])} to {r.choice(['kilometers', 'kilograms', 'euros', 'meters'])}",
    lambda r: f"read my {r.choice(['email', 'messages', 'notes', 'news'])}",
    lambda r: f"{r.choice(['show', 'find'])} {r.choice(['photos', 'videos', 'documents'])} from {r.choice(_MONTHS)}",
    lambda r: f"the meeting starts at {_time_of_day(r)} on {r.choice(_WEEKDAYS)}",
    lambda r: f"please {r.choice(['repeat', 'spell', 'say'])} that {r.choice(['again', 'slowly', 'one more time'])}",
    lambda r: r.choice(_SHORT),
    lambda r: f"{r.choice(_SHORT)}, {r.choice(_SHORT)}",
]


def command_phrases(rng: random.Random, n: int) -> list[str]:
    """``n`` draws of everyday commands and questions (with repeats; callers deduplicate)."""
    return [re.sub(r"\s+", " ", rng.choice(_COMMAND_TEMPLATES)(rng)).strip() for _ in range(n)]


def _digit_string(rng: random.Random, lo: int, hi: int) -> str:
    """A digit sequence read digit by digit, with "oh" for zero sometimes, as people read codes."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    oh = rng.random() < 0.4
    return " ".join("oh" if (d == 0 and oh) else words[d] for d in (rng.randint(0, 9) for _ in range(rng.randint(lo, hi))))


def _counting(rng: random.Random) -> str:
    """A run of consecutive numbers ("seven eight nine ten"), as in counting aloud."""
    start = rng.randint(0, 15)
    return " ".join(str(i) for i in range(start, start + rng.randint(3, 8)))


def _ordinal(n: int) -> str:
    """``n`` with its English ordinal suffix in digits ("1st", "12th", "23rd")."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_NUMBER_TEMPLATES = [
    lambda r: _digit_string(r, 2, 10),
    lambda r: _digit_string(r, 3, 7),
    lambda r: f"my number is {_digit_string(r, 7, 10)}",
    lambda r: f"the code is {_digit_string(r, 4, 6)}",
    lambda r: f"extension {_digit_string(r, 3, 5)}",
    lambda r: f"room {_n(r, 1, 999)}",
    lambda r: f"flight {_n(r, 10, 999)} to {r.choice(_CITIES)}",
    lambda r: f"{_n(r, 0, 100)}",
    lambda r: f"{_n(r, 0, 20)} {r.choice(['and', 'or', 'to'])} {_n(r, 0, 20)}",
    lambda r: f"{_n(r, 100, 999999)}",
    lambda r: f"it costs ${_n(r, 1, 500)}.{r.randint(0, 99):02d}",
    lambda r: f"about {_n(r, 2, 99)} percent of the {r.choice(['people', 'votes', 'time', 'budget'])}",
    lambda r: f"in {_n(r, 1200, 2030)}",
    lambda r: f"{r.choice(_MONTHS)} {_ordinal(r.randint(1, 31))}, {_n(r, 1900, 2030)}",
    lambda r: f"on the {_ordinal(r.randint(1, 31))} of {r.choice(_MONTHS)}",
    lambda r: f"at {_time_of_day(r)}",
    lambda r: f"page {_n(r, 1, 600)} line {_n(r, 1, 40)}",
    lambda r: f"{_n(r, 1, 60)} {r.choice(['minutes', 'seconds', 'hours', 'days', 'weeks', 'years'])} {r.choice(['ago', 'later', 'left', ''])}",
    lambda r: f"count from {_n(r, 1, 10)} to {_n(r, 11, 30)}",
    lambda r: _counting(r),
    lambda r: f"{_n(r, 2, 12)} {r.choice(['plus', 'minus', 'times'])} {_n(r, 2, 12)} is {_n(r, 0, 144)}",
    lambda r: f"{_n(r, 1, 5)}.{_n(r, 0, 99)} {r.choice(['kilograms', 'liters', 'meters', 'miles'])}",
]


def number_phrases(rng: random.Random, n: int) -> list[str]:
    """``n`` draws of number-heavy phrases (with repeats; callers deduplicate)."""
    return [re.sub(r"\s+", " ", rng.choice(_NUMBER_TEMPLATES)(rng)).strip() for _ in range(n)]
