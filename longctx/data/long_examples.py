"""Long-dependency examples made from the conversations themselves (data.long_examples).

A ShareGPT conversation is ~1.3K tokens, so packing alone never asks a model to use anything far
back. A long example is one attention span of L tokens (L drawn from [min_tokens, max_tokens]):

    [tail of a conversation]  [conversation] [note] [conversation] ... [conversation]   <- context
    [user: question 1] [assistant: answer 1] ... [user: question q] [assistant: answer q]   <- tail

and the loss counts only the answers (and their end-of-turn token). The questions need the context:
- recall_turn: every context conversation is headed "### Conversation <id>"; "quote the first
  sentence the user wrote in conversation <id>" -> that sentence;
- kv_lookup: notes "the value stored under key <key> is <value>" sit between conversations (some
  never asked); "which value is stored under key <key>?" -> the value;
- multi_hop: chains of notes "key <a> points to key <b>" ... "the value stored under key <z> is
  <value>", their links scattered through the context in any order; "start at key <a> and follow
  the notes" -> the value.
The q answers of an example sit at depths spread through its context (one drawn in each of q equal
strata), so every depth is trained. Keys and values are UUID-like hex strings and conversation ids
are hex too: none of these formats is one of the evaluation's (longctx/eval/tasks.py: a numeric
"magic number" needle, passkeys, "line <adjective-noun-noun>: REGISTER_CONTENT is <n>"), so a
model scored there shows long context learned, not a format memorised.

What the literature found and this follows: mix long examples with ordinary short data to keep
short-context quality (LongAlign, ProLong: data.long_examples.ratio of the rows, the rest ordinary
packed conversations); the loss on answers only (LongAlign; ProLong's instruction stage);
documents in their own attention spans (ProLong's document masking: the default
data.attention_span=document, a long example being one span).

Examples are made when a row is assembled, from a generator seeded with (train.seed, epoch, index):
the same seed gives the same rows, an epoch gives new examples (fresh conversations, keys and
depths) of new lengths, and a resumed loader rebuilds exactly the rows it would have taken. Only
the tokenized conversations and each conversation's first sentence come from the data cache.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

TASKS = ("recall_turn", "kv_lookup", "multi_hop")
DISTRIBUTIONS = ("uniform", "log_uniform")
FIRST_USER_FILE = "first_user.json"

RECALL_QUESTIONS = ("In conversation {id} above, what was the user's first message? Quote its first sentence.",
                    "Quote the first sentence the user wrote in conversation {id}.",
                    "How did the user open conversation {id}? Repeat their first sentence exactly.")
KV_QUESTIONS = ("Which value is stored under key {key} in the notes above? Reply with the value only.",
                "Look up key {key} in the notes above. What is its value?")
HOP_QUESTIONS = ("Start at key {key} and follow the notes above from key to key. Which value do you reach?",
                 "Key {key} leads, note by note, to a stored value. Which one?")
CONVERSATION_HEADER = "\n### Conversation {id}\n"
VALUE_NOTE = "\nNote: the value stored under key {key} is {value}.\n"
LINK_NOTE = "\nNote: key {key} points to key {next}.\n"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class LongExamplesConfig:
    # the fraction of rows that are long-dependency examples (0: none, 1: every row)
    ratio: float = 0.0
    # example lengths in tokens, drawn in [min_tokens, max_tokens]; None: max_tokens // 4 and train.seq_len
    min_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    # how lengths are drawn: "uniform" or "log_uniform" (more short ones, as natural length mixes)
    distribution: str = "uniform"
    # the tasks examples are drawn from, each equally often
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    # question/answer exchanges closing each example (fewer in a short one: one per 1024 tokens)
    questions: int = 4

    def validate(self) -> "LongExamplesConfig":
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"data.long_examples.ratio={self.ratio} must be in [0, 1]")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"data.long_examples.distribution={self.distribution!r} is not one of {DISTRIBUTIONS}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"data.long_examples.tasks={list(self.tasks)}: choose a non-empty list from {list(TASKS)}")
        if self.questions < 1:
            raise ValueError(f"data.long_examples.questions={self.questions} must be at least 1")
        return self

    def length_range(self, seq_len: int) -> tuple[int, int]:
        high = seq_len if self.max_tokens is None else int(self.max_tokens)
        low = max(high // 4, 1) if self.min_tokens is None else int(self.min_tokens)
        if high > seq_len:
            raise ValueError(f"data.long_examples.max_tokens={high} is longer than train.seq_len={seq_len}: "
                             f"a long example is one row; use data.long_examples.max_tokens<={seq_len}")
        if low < 512 or low > high:
            raise ValueError(f"data.long_examples.min_tokens={low} must be in [512, max_tokens={high}]")
        return low, high

    def mean_length(self, seq_len: int) -> float:
        low, high = self.length_range(seq_len)
        if self.distribution == "uniform" or low == high:
            return (low + high) / 2
        return (high - low) / math.log(high / low)

    def signature(self) -> str:
        """What changes the rows: resuming with another signature cannot be exact."""
        return json.dumps({"ratio": self.ratio, "min": self.min_tokens, "max": self.max_tokens,
                           "distribution": self.distribution, "tasks": list(self.tasks),
                           "questions": self.questions}, sort_keys=True)

    @classmethod
    def of(cls, value) -> "LongExamplesConfig":
        if isinstance(value, cls):
            return value
        return cls(**{str(k): (list(value[k]) if str(k) == "tasks" else value[k]) for k in value.keys()})


def first_sentence(conversation: list[dict]) -> Optional[str]:
    """The first sentence of the first user message: a recall answer. None when it is too short
    (under 4 words: "continue", "hi") or too long (over 200 characters) to be a fair question."""
    text = next((m["content"] for m in conversation if m["role"] == "user"), "")
    line = text.strip().split("\n", 1)[0].strip()
    end = _SENTENCE_END.search(line)
    sentence = line[:end.end()] if end else line
    if len(sentence.split()) < 4 or len(sentence) > 200:
        return None
    return sentence


def example_count(ratio: float, ordinary_tokens: int, seq_len: int, mean_length: float) -> int:
    """How many long examples make `ratio` of the rows: long rows take mean_length tokens of an
    example and the rest of the row from the ordinary data, whose remaining tokens fill rows of
    their own; ratio 1 makes as many rows as the ordinary data would fill alone, all long."""
    if ratio <= 0:
        return 0
    if ratio >= 1:
        return max(1, round(ordinary_tokens / seq_len))
    return max(1, round(ratio * ordinary_tokens / (seq_len - ratio * mean_length)))


@dataclass
class LongExample:
    tokens: np.ndarray      # [L] int64
    loss_mask: np.ndarray   # [L] int8: the answers and their end-of-turn tokens
    task: str
    context_tokens: int     # tokens before the closing questions
    answers: list           # per question: {"answer", "at" (token index of its item), "depth", "question"}


class LongExampleMaker:
    """Makes long example `index` of `epoch` at a given length, from tokenized conversations."""

    def __init__(self, store, first_user: list, tokenizer, chat_template: str, cfg: LongExamplesConfig,
                 seed: int):
        self.store, self.tokenizer, self.chat_template = store, tokenizer, chat_template
        self.cfg, self.seed = LongExamplesConfig.of(cfg).validate(), seed
        self.first_user = first_user
        self.lengths_all = np.asarray(store.lengths)
        if "recall_turn" in self.cfg.tasks and not any(s is not None for s in first_user):
            raise ValueError("data.long_examples.tasks has recall_turn, but no conversation's first user "
                             "sentence has 4-200 characters' worth of words; drop recall_turn")

    # -- the epoch's lengths -------------------------------------------------------------------
    def lengths(self, count: int, seq_len: int, epoch: int) -> np.ndarray:
        low, high = self.cfg.length_range(seq_len)
        rng = np.random.default_rng([self.seed, epoch, 0x1E6])
        if self.cfg.distribution == "uniform":
            drawn = rng.integers(low, high + 1, size=count)
        else:
            drawn = np.floor(np.exp(rng.uniform(math.log(low), math.log(high + 1), size=count)))
        return np.clip(drawn, low, high).astype(np.int64)

    # -- one example ---------------------------------------------------------------------------
    def make(self, epoch: int, index: int, length: int) -> LongExample:
        rng = np.random.default_rng([self.seed, epoch, index, 0x10E])
        task = self.cfg.tasks[int(rng.integers(len(self.cfg.tasks)))]
        questions = max(1, min(self.cfg.questions, length // 1024))
        depths = rng.permutation((np.arange(questions) + rng.uniform(size=questions)) / questions)
        for attempt in range(8):   # a draw whose closing questions leave no room is redrawn, shorter
            example = self._try(rng, task, questions, depths, length)
            if example is not None:
                return example
            questions = max(1, questions // 2)
            depths = depths[:questions]
            others = [t for t in self.cfg.tasks if t != "recall_turn"]
            if attempt >= 3 and task == "recall_turn" and others:   # no conversation fits so short an example
                task = others[int(rng.integers(len(others)))]
        raise ValueError(f"a long example of {length} tokens cannot hold its questions and notes; "
                         f"raise data.long_examples.min_tokens")

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from .template import _encode
        return [ids.astype(np.int64) for ids, _ in _encode(self.tokenizer, texts)] if texts else []

    def _tail(self, exchanges: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        # tokenize_conversations' steps, with the template resolved once (resolving reads the
        # whole vocabulary: half a second a call with a 128K one)
        from .template import _encode, _render, loss_mask_of
        messages = [m for q, a in exchanges for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": a})]
        rendered = _render(messages, self.tokenizer, self.chat_template)
        ids, starts = _encode(self.tokenizer, [rendered.text])[0]
        return ids.astype(np.int64), loss_mask_of(starts, rendered.reply_spans, "assistant")

    def _hex(self, rng, used: set, groups: int) -> str:
        while True:
            text = "-".join(f"{int(v):04x}" for v in rng.integers(0, 1 << 16, size=groups))
            if text not in used:
                used.add(text)
                return text

    def _try(self, rng, task: str, questions: int, depths: np.ndarray, length: int) -> Optional[LongExample]:
        used: set = set()
        # notes (kv_lookup, multi_hop): (text, depth it goes to, question index whose answer it holds or -1)
        notes, exchanges = [], []
        if task == "kv_lookup":
            for q in range(questions + 2 * questions):    # twice as many notes nobody asks about
                key, value = self._hex(rng, used, 2), self._hex(rng, used, 3)
                asked = q < questions
                notes.append((VALUE_NOTE.format(key=key, value=value), depths[q] if asked else rng.uniform(),
                              q if asked else -1))
                if asked:
                    template = KV_QUESTIONS[int(rng.integers(len(KV_QUESTIONS)))]
                    exchanges.append((template.format(key=key), value))
        elif task == "multi_hop":
            for q in range(questions):
                hops = int(rng.integers(2, 4))
                keys = [self._hex(rng, used, 2) for _ in range(hops)]
                value = self._hex(rng, used, 3)
                for a, b in zip(keys, keys[1:]):
                    notes.append((LINK_NOTE.format(key=a, next=b), rng.uniform(), -1))
                notes.append((VALUE_NOTE.format(key=keys[-1], value=value), depths[q], q))
                template = HOP_QUESTIONS[int(rng.integers(len(HOP_QUESTIONS)))]
                exchanges.append((template.format(key=keys[0]), value))
            for _ in range(questions):                       # values no chain reaches
                notes.append((VALUE_NOTE.format(key=self._hex(rng, used, 2), value=self._hex(rng, used, 3)),
                              rng.uniform(), -1))
        note_ids = self._encode([text for text, _, _ in notes])
        note_tokens = sum(len(ids) for ids in note_ids)
        header_estimate = 12 if task == "recall_turn" else 0
        tail_reserve = 64 + 80 * questions
        budget = length - tail_reserve - note_tokens
        if budget < 0:
            return None

        # the context conversations, whole, in a random order
        chosen, total, misses = [], 0, 0
        for doc in rng.permutation(len(self.lengths_all)):
            cost = int(self.lengths_all[doc]) + header_estimate
            if total + cost <= budget:
                chosen.append(int(doc))
                total += cost
                misses = 0
            else:
                misses += 1
                if misses > 32 or budget - total < 64:
                    break

        headers, targets = [], []
        if task == "recall_turn":
            if not chosen:
                return None
            starts = np.cumsum([0] + [int(self.lengths_all[d]) + header_estimate for d in chosen])
            fractions = starts[:-1] / max(starts[-1], 1)
            answers = [self.first_user[d] for d in chosen]
            counts: dict = {}
            for a in answers:
                counts[a] = counts.get(a, 0) + 1
            candidates = [i for i, a in enumerate(answers) if a is not None and counts[a] == 1]
            if not candidates:
                return None
            ids = [self._hex(rng, used, 2) for _ in chosen]
            headers = self._encode([CONVERSATION_HEADER.format(id=i) for i in ids])
            taken: set = set()
            for depth in depths:   # the free candidate nearest each depth
                free = [i for i in candidates if i not in taken]
                if not free:
                    break
                best = min(free, key=lambda i: abs(fractions[i] - depth))
                taken.add(best)
                targets.append(best)
                template = RECALL_QUESTIONS[int(rng.integers(len(RECALL_QUESTIONS)))]
                exchanges.append((template.format(id=ids[best]), answers[best]))
        tail_ids, tail_mask = self._tail(exchanges)

        # lay out the context: conversations (with headers), notes at the boundary nearest their depth
        boundaries = np.cumsum([0] + [int(self.lengths_all[d]) for d in chosen])
        boundary_fraction = boundaries / max(boundaries[-1], 1)
        slots: dict = {}
        for n, (_, depth, _) in enumerate(notes):
            slot = int(np.abs(boundary_fraction - depth).argmin())
            slots.setdefault(slot, []).append(n)
        parts, owners = [], []   # token arrays (a note; a header with its conversation), and the answer each holds
        for i in range(len(chosen) + 1):
            for n in slots.get(i, []):
                parts.append(note_ids[n])
                owners.append(notes[n][2])
            if i == len(chosen):
                break
            begin, end = self.store.offsets[chosen[i]], self.store.offsets[chosen[i] + 1]
            conversation = np.asarray(self.store.tokens[begin:end], dtype=np.int64)
            parts.append(np.concatenate([headers[i], conversation]) if headers else conversation)
            owners.append(targets.index(i) if i in targets else -1)
        gap = length - len(tail_ids) - sum(len(p) for p in parts)
        while gap < 0:   # the closing questions came out longer than reserved: drop an unasked part
            drop = next((k for k, o in enumerate(owners) if o == -1), None)
            if drop is None:
                return None
            gap += len(parts.pop(drop))
            owners.pop(drop)
        filler = self._filler(rng, gap, set(chosen))
        parts.insert(0, filler)
        owners.insert(0, -1)

        tokens = np.concatenate(parts + [tail_ids])
        loss_mask = np.concatenate([np.zeros(len(tokens) - len(tail_ids), dtype=np.int8), tail_mask])
        context = len(tokens) - len(tail_ids)
        at = np.cumsum([0] + [len(p) for p in parts])[:-1]
        answers_out = []
        for q, (question, answer) in enumerate(exchanges):
            k = owners.index(q)
            answers_out.append({"question": question, "answer": answer, "at": int(at[k]),
                                "end": int(at[k] + len(parts[k])),
                                "depth": float(at[k] / max(context, 1))})
        return LongExample(tokens, loss_mask, task, context, answers_out)

    def _filler(self, rng, gap: int, exclude: set) -> np.ndarray:
        """`gap` tokens from the end of further conversations: the context starts mid-transcript,
        so the example is exactly its drawn length."""
        pieces, have = [], 0
        for doc in rng.permutation(len(self.lengths_all)):
            if have >= gap:
                break
            if int(doc) in exclude and len(exclude) < len(self.lengths_all):
                continue
            begin, end = self.store.offsets[doc], self.store.offsets[doc + 1]
            pieces.insert(0, np.asarray(self.store.tokens[begin:end], dtype=np.int64))
            have += int(end - begin)
        if have < gap:   # tiny data: repeat what there is
            reps = -(-gap // max(have, 1))
            pieces = pieces * reps
        joined = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        return joined[len(joined) - gap:] if gap else joined[:0]


def load_first_user(cache_folder) -> list:
    from pathlib import Path
    path = Path(cache_folder) / FIRST_USER_FILE
    if not path.exists():
        raise ValueError(f"{cache_folder} holds no {FIRST_USER_FILE}: data.long_examples needs data.format=sharegpt "
                         f"(conversations to make them of)")
    return json.loads(path.read_text())
