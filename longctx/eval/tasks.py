"""The retrieval tasks of the long-context literature, generated from a seed.

Line retrieval (LongChat, Ring Attention): many numbered lines
    line swift-harbor-reef: REGISTER_CONTENT is <48213>
and a question for one of them. Needle in a haystack: one sentence ("the special magic number for
Lisbon is 4821307.") hidden at a given depth of real text, and a question about it.

A `Sample` holds the prompt text, the expected answer and where the answer sits (`depth`: the
fraction of the context before the line or needle). The same seed gives the same sample; the
answer occurs in the prompt exactly once (values are drawn distinct from each other and absent from
the haystack).

Lengths are in tokens of the tokenizer the model reads: `fit_line_retrieval` and `make_needle` take
any object with `encode(text, add_special_tokens=False) -> list[int]` and `decode(ids) -> str` (a
transformers tokenizer).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

LINE_HEADER = ("Below is a record of lines. Each line starts with 'line <name>' and ends with a "
               "REGISTER_CONTENT, a number. Remember the REGISTER_CONTENT of every line: at the end "
               "you will be asked for the REGISTER_CONTENT of one line.\n\n")
LINE_TEMPLATE = "line {name}: REGISTER_CONTENT is <{value}>\n"
LINE_QUESTION = "\nWhat is the REGISTER_CONTENT in line {name}? Answer with the number only.\nAnswer: <"

NEEDLE_TEMPLATE = " The special magic number for {key} is {value}. "
NEEDLE_QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the text above? "
                   "Answer with the number only.\nAnswer:")

ADJECTIVES = ("amber", "bold", "brisk", "calm", "clever", "cosy", "crisp", "dark", "eager", "early",
              "faint", "fierce", "gentle", "glad", "grand", "green", "hollow", "humble", "icy", "jolly",
              "keen", "late", "lively", "lone", "loud", "lucky", "mellow", "merry", "misty", "noble",
              "odd", "pale", "plain", "proud", "quick", "quiet", "rapid", "rough", "rusty", "shy",
              "silent", "sly", "steady", "swift", "tidy", "vast", "warm", "wild")
NOUNS = ("anchor", "badger", "beacon", "canyon", "cedar", "comet", "coral", "delta", "ember", "falcon",
         "fern", "fjord", "garden", "glacier", "harbor", "heron", "island", "jasper", "kettle", "lagoon",
         "lantern", "maple", "meadow", "meteor", "mirror", "nebula", "oasis", "orchid", "otter", "pebble",
         "pepper", "prairie", "quartz", "raven", "reef", "river", "saddle", "summit", "thistle", "timber",
         "tundra", "valley", "violet", "walnut", "willow", "wren", "yonder", "zephyr")
# what a prompt ends with to start the answer: a chat model gets it as the start of its reply
LINE_CUE = "Answer: <"
NEEDLE_CUE = "Answer:"
PASSKEY_CUE = " The pass key is"

# the passkey test of Landmark Attention / Position Interpolation: repeated filler, one line with
# a number, and the question
PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "The pass key is {value}. Remember it. {value} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key?"

NEEDLE_KEYS = ("Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Tbilisi", "Montevideo", "Reykjavik",
               "Auckland", "Dakar", "Kyoto", "Valparaiso", "Tallinn", "Cusco", "Zanzibar", "Marrakesh")


@dataclass
class Sample:
    prompt: str                # the context and the question: the model continues it with the answer
    answer: str                # the expected answer (a number, as text)
    depth: float               # fraction of the context before the answer-bearing line or needle
    task: str                  # "line_retrieval" | "needle" | "passkey"
    meta: dict = field(default_factory=dict)

    @property
    def cue(self) -> str:
        """The end of the prompt that starts the answer ("" when the prompt has none): a chat
        model reads the prompt without it as the user's turn and gets it as the start of its reply."""
        cue = self.meta.get("cue", "")
        return cue if cue and self.prompt.endswith(cue) else ""


def _distinct_numbers(rng: random.Random, count: int, digits: int, forbidden: str = "") -> list[str]:
    """`count` distinct numbers of exactly `digits` digits, none occurring in `forbidden`."""
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    if high - low + 1 <= 1000:   # few candidates: draw from those that are allowed
        allowed = [str(n) for n in range(low, high + 1) if str(n) not in forbidden]
        if count > len(allowed):
            raise ValueError(f"cannot draw {count} distinct {digits}-digit values absent from the text "
                             f"({len(allowed)} are); use more digits")
        return rng.sample(allowed, count)
    if count > (high - low + 1) // 2:
        raise ValueError(f"cannot draw {count} distinct {digits}-digit values; use more digits")
    values: list[str] = []
    seen: set[str] = set()
    while len(values) < count:
        value = str(rng.randint(low, high))
        if value not in seen and value not in forbidden:
            seen.add(value)
            values.append(value)
    return values


def line_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct adjective-noun-noun names (110592 of them: some 1.7M tokens of lines) in a
    seeded order."""
    a, n = len(ADJECTIVES), len(NOUNS)
    if count > a * n * n:
        raise ValueError(f"at most {a * n * n} lines have distinct names; asked for {count}")
    return [f"{ADJECTIVES[p // (n * n)]}-{NOUNS[p // n % n]}-{NOUNS[p % n]}"
            for p in rng.sample(range(a * n * n), count)]


def depth_index(depth: float, count: int) -> int:
    """The item at fraction `depth` (0: first, 1: last) of `count` items."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0: start of the context, 1: its end); got {depth}")
    return round(depth * (count - 1))


def make_line_retrieval(num_lines: int, depth: float, seed: int, *, names: list[str] | None = None,
                        digits: int = 5, header: str = LINE_HEADER, line_template: str = LINE_TEMPLATE,
                        question: str = LINE_QUESTION) -> Sample:
    """A prompt of `num_lines` lines and a question for the line at fraction `depth` of them.

    `names` overrides the generated line names (a vocabulary to draw `num_lines` distinct names
    from, seeded); `digits` is the length of every value. The answer is the asked line's value.
    """
    if num_lines < 1:
        raise ValueError(f"num_lines must be at least 1, got {num_lines}")
    rng = random.Random(f"line_retrieval/{seed}/{num_lines}/{depth}")
    if names is None:
        chosen = line_names(num_lines, rng)
    else:
        if num_lines > len(set(names)):
            raise ValueError(f"{num_lines} lines need as many distinct names; got {len(set(names))}")
        chosen = rng.sample(sorted(set(names)), num_lines)
    values = _distinct_numbers(rng, num_lines, digits, forbidden=header + question)
    target = depth_index(depth, num_lines)
    lines = [line_template.format(name=n, value=v) for n, v in zip(chosen, values)]
    prompt = header + "".join(lines) + question.format(name=chosen[target])
    return Sample(prompt=prompt, answer=values[target], depth=target / max(num_lines - 1, 1),
                  task="line_retrieval",
                  meta={"num_lines": num_lines, "line": target, "name": chosen[target], "asked_depth": depth,
                        "seed": seed, "cue": LINE_CUE})


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def fit_line_retrieval(tokenizer, length: int, depth: float, seed: int, lines_hint: int | None = None,
                       **kwargs) -> Sample:
    """The line-retrieval sample with the most lines whose prompt has at most `length` tokens.

    Each try tokenizes a whole prompt (seconds at 512K tokens): `lines_hint`, the line count found
    for the same length before, starts the search next to the answer."""
    def tokens_of(lines):
        sample = make_line_retrieval(lines, depth, seed, **kwargs)
        return sample, count_tokens(tokenizer, sample.prompt)

    _, one = tokens_of(1)
    if one > length:
        raise ValueError(f"a prompt with a single line already has {one} tokens > length {length}")
    per_line = max((tokens_of(17)[1] - one) / 16, 1.0)      # names vary in length: average some
    lines = lines_hint or max(1, 1 + int((length - one) / per_line))
    sample, tokens = tokens_of(lines)
    while tokens > length and lines > 1:                    # too long: step back
        lines = max(1, lines - max(1, int((tokens - length) / per_line)))
        sample, tokens = tokens_of(lines)
    while True:                                             # room left: step forward
        bigger, more = tokens_of(lines + max(1, int((length - tokens) / per_line)))
        if more > length:
            break
        lines, sample, tokens = bigger.meta["num_lines"], bigger, more
    if (length - tokens) > 2 * per_line:                    # the last big step overshot: one line at a time
        while (bigger := tokens_of(lines + 1))[1] <= length:
            lines, (sample, tokens) = lines + 1, bigger
    sample.meta.update(length=length, tokens=tokens)
    return sample


# ------------------------------------------------------------------------------------------------
# needle in a haystack
# ------------------------------------------------------------------------------------------------
def haystack_text(conversations: list[list[dict]], max_chars: int | None = None) -> str:
    """Real text to hide a needle in: the turns of ShareGPT conversations, one after the other
    (the first `max_chars` characters, when given: tokenizing all of a large file takes minutes)."""
    parts, size = [], 0
    for message in (m for c in conversations for m in c):
        if max_chars is not None and size >= max_chars:
            break
        if message["content"].strip():
            parts.append(message["content"].strip())
            size += len(parts[-1]) + 2
    text = "\n\n".join(parts)
    if not text:
        raise ValueError("the haystack is empty: the conversations hold no text")
    return text


_SENTENCE_END = re.compile(r"[.!?]\s+|\n+")


def sentence_boundary(text: str, position: int) -> int:
    """The start of the sentence that `position` falls in (0 when none ends before it)."""
    last = 0
    for match in _SENTENCE_END.finditer(text, 0, position + 1):
        if match.end() > position:
            break
        last = match.end()
    return last


class Haystack:
    """Haystack text tokenized once; windows of it cut by token count."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.text = text
        self.ids = tokenizer.encode(text, add_special_tokens=False)

    def window(self, tokens: int, start: int = 0) -> tuple[str, bool]:
        """`tokens` tokens from `start` as text; the haystack repeats if it is too short (flagged)."""
        ids = self.ids
        repeated = start + tokens > len(ids)
        if repeated:
            ids = ids * (1 + (start + tokens) // len(ids))
        return self.tokenizer.decode(ids[start:start + tokens]), repeated


def make_needle(haystack: Haystack, length: int, depth: float, seed: int, *, digits: int = 7,
                needle: str = NEEDLE_TEMPLATE, question: str = NEEDLE_QUESTION,
                random_start: bool = False) -> Sample:
    """A needle at fraction `depth` of about `length` tokens of haystack, then the question.

    The needle goes to the start of the sentence where the depth falls (as in the original
    needle-in-a-haystack test), so it does not cut a sentence. `random_start` draws the window's
    start in the haystack from the seed; otherwise every sample reads the haystack from its start.
    """
    rng = random.Random(f"needle/{seed}/{length}/{depth}")
    key = rng.choice(NEEDLE_KEYS)
    budget = length - count_tokens(haystack.tokenizer, needle.format(key=key, value="0" * digits)
                                   + question.format(key=key))
    if budget < 1:
        raise ValueError(f"length {length} leaves no room for haystack around the needle and question")
    start = rng.randrange(max(len(haystack.ids) - budget, 1)) if random_start else 0
    context, repeated = haystack.window(budget, start)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0: start of the context, 1: its end); got {depth}")
    at = len(context) if depth == 1.0 else sentence_boundary(context, int(depth * len(context)))
    (value,) = _distinct_numbers(rng, 1, digits, forbidden=context + question)
    sentence = needle.format(key=key, value=value)
    prompt = context[:at] + sentence + context[at:] + question.format(key=key)
    full = len(context) + len(sentence)
    return Sample(prompt=prompt, answer=value, depth=at / max(len(context), 1), task="needle",
                  meta={"length": length, "asked_depth": depth, "key": key, "needle_at": at,
                        "context_chars": full, "haystack_repeated": repeated, "seed": seed, "cue": NEEDLE_CUE,
                        "tokens": count_tokens(haystack.tokenizer, prompt)})


# ------------------------------------------------------------------------------------------------
# passkey retrieval
# ------------------------------------------------------------------------------------------------
def make_passkey(fillers: int, depth: float, seed: int, *, digits: int = 5) -> Sample:
    """The passkey line after `round(depth * fillers)` of `fillers` repeated filler sentences."""
    if fillers < 0:
        raise ValueError(f"fillers must be >= 0, got {fillers}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0: start of the context, 1: its end); got {depth}")
    rng = random.Random(f"passkey/{seed}/{fillers}/{depth}")
    (value,) = _distinct_numbers(rng, 1, digits, forbidden=PASSKEY_HEADER + PASSKEY_FILLER + PASSKEY_QUESTION)
    before = round(depth * fillers)
    prompt = (PASSKEY_HEADER + PASSKEY_FILLER * before + PASSKEY_LINE.format(value=value)
              + PASSKEY_FILLER * (fillers - before) + PASSKEY_QUESTION + PASSKEY_CUE)
    return Sample(prompt=prompt, answer=value, depth=before / max(fillers, 1), task="passkey",
                  meta={"fillers": fillers, "asked_depth": depth, "seed": seed, "cue": PASSKEY_CUE})


def fit_passkey(tokenizer, length: int, depth: float, seed: int) -> Sample:
    """The passkey sample with the most filler whose prompt has at most `length` tokens (the filler
    tokenizes the same every time: two probes give its cost, a few more steps settle the count)."""
    def tokens_of(fillers):
        sample = make_passkey(fillers, depth, seed)
        return sample, count_tokens(tokenizer, sample.prompt)

    _, bare = tokens_of(0)
    if bare > length:
        raise ValueError(f"a passkey prompt without filler already has {bare} tokens > length {length}")
    per_filler = max((tokens_of(16)[1] - bare) / 16, 1.0)
    fillers = int((length - bare) / per_filler)
    sample, tokens = tokens_of(fillers)
    while tokens > length and fillers > 0:
        fillers -= max(1, int((tokens - length) / per_filler))
        sample, tokens = tokens_of(max(fillers, 0))
    while (bigger := tokens_of(fillers + 1))[1] <= length:
        fillers, (sample, tokens) = fillers + 1, bigger
    sample.meta.update(length=length, tokens=tokens)
    return sample
