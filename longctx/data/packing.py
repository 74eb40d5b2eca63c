"""Packing tokenized conversations into sequences of exactly seq_len tokens.

The tokens of all conversations live in flat arrays (`TokenStore`); everything here works on
(document, start, end) ranges of them with numpy, so a 512K-token sequence costs a few array
operations, never a Python loop per token.

1. `cut_documents`: every conversation becomes one or more pieces of at most seq_len tokens.
   A longer one is truncated after its last whole exchange (user turn + reply) that fits, or
   split into several pieces at user turns, each continuation starting with a copy of the
   conversation's prefix (begin-of-text and system prompt). A single exchange longer than
   seq_len is cut inside the reply, keeping the question; a piece with no loss tokens left is
   dropped and counted.
2. `pack`: the pieces, shuffled, go into sequences ("bins") of seq_len tokens, greedily in order
   (next fit) or to the fullest sequence they fit in (best fit).
3. `assemble`: the arrays of one sequence: input_ids, labels (-100 outside the loss, at the copy
   of a prefix and at the first token of each document, whose prediction would cross a document
   boundary), position_ids restarting at each document, and the document lengths. Padding comes
   last and is a document of its own (pad ids, labels -100, positions from 0).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass

import numpy as np

PACKINGS = ("best_fit", "greedy")
OVERLONG = ("split", "truncate")
ATTENTION_SPANS = ("document", "row")
IGNORE_INDEX = -100


@dataclass
class TokenStore:
    """All tokenized conversations, flat: document d is tokens[offsets[d]:offsets[d+1]]."""
    tokens: np.ndarray           # [N] int32
    loss_mask: np.ndarray        # [N] int8, 1 where the token counts for the loss
    offsets: np.ndarray          # [D + 1] int64
    exchange_starts: np.ndarray  # flat int32: token index (within its document) of each user turn
    exchange_offsets: np.ndarray  # [D + 1] int64 into exchange_starts

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def exchanges(self, doc: int) -> np.ndarray:
        return self.exchange_starts[self.exchange_offsets[doc]:self.exchange_offsets[doc + 1]]

    def loss_count(self, doc: int, start: int, end: int) -> int:
        base = self.offsets[doc]
        return int(self.loss_mask[base + start:base + end].sum())

    @classmethod
    def from_lists(cls, input_ids, loss_masks, exchange_starts) -> "TokenStore":
        """From per-document sequences (for tests and small data)."""
        def flat(parts, dtype):
            parts = [np.asarray(p, dtype=dtype) for p in parts]
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            return (np.concatenate(parts) if parts else np.zeros(0, dtype)), offsets
        tokens, offsets = flat(input_ids, np.int32)
        mask, _ = flat(loss_masks, np.int8)
        starts, exchange_offsets = flat(exchange_starts, np.int32)
        return cls(tokens, mask, offsets, starts, exchange_offsets)


@dataclass
class Pieces:
    """Samples cut from documents: the first `prefix` tokens of `doc`, then tokens [start, end)."""
    doc: np.ndarray     # int64
    start: np.ndarray   # int64
    end: np.ndarray     # int64
    prefix: np.ndarray  # int64, 0 unless this is a continuation of a split conversation

    @property
    def lengths(self) -> np.ndarray:
        return self.prefix + self.end - self.start

    def __len__(self) -> int:
        return len(self.doc)


def _cut_one(store: TokenStore, doc: int, seq_len: int, overlong: str, counts: Counter) -> list[tuple]:
    """Pieces (doc, start, end, prefix) of one document longer than seq_len."""
    length = int(store.lengths[doc])
    starts = [int(s) for s in store.exchanges(doc)] or [0]
    prefix = starts[0]  # begin-of-text and system prompt: copied in front of each continuation
    exchanges = list(zip(starts, starts[1:] + [length]))

    pieces = []
    piece = None  # the piece being filled: [start, prefix copied, end of what it holds, holds an exchange]
    for i, (ex_start, ex_end) in enumerate(exchanges):
        while True:
            if piece is None:
                if i == 0:  # the first piece holds the document's own prefix
                    piece = [0, 0, ex_start, False]
                else:
                    copied = prefix if prefix + ex_end - ex_start <= seq_len else 0
                    piece = [ex_start, copied, ex_start, False]
            start, copied, held, has_exchange = piece
            if copied + ex_end - start <= seq_len:
                piece[2:] = [ex_end, True]
                break
            if has_exchange:  # close the piece; the exchange goes to the next one
                pieces.append((doc, start, held, copied))
                piece = None
                if overlong == "truncate":
                    break
                continue
            # one exchange longer than a sequence: keep the question and the start of the reply
            pieces.append((doc, start, start + seq_len - copied, copied))
            counts["exchange_cut_inside"] += 1
            piece = None
            break
        if overlong == "truncate" and pieces:
            break
    if piece is not None and piece[3]:
        pieces.append((doc, piece[0], piece[2], piece[1]))

    kept = []
    for piece in pieces:
        if store.loss_count(doc, piece[1], piece[2]) > 0:
            kept.append(piece)
        else:
            counts["piece_without_loss_dropped"] += 1
    counts["pieces_from_overlong"] += len(kept)
    return kept


def cut_documents(store: TokenStore, seq_len: int, overlong: str = "split") -> tuple[Pieces, dict]:
    """Every document as pieces of at most seq_len tokens (see the module docstring)."""
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong handling {overlong!r}; expected one of {OVERLONG}")
    lengths = store.lengths
    fits = lengths <= seq_len
    counts: Counter = Counter(overlong_documents=int((~fits).sum()))
    short = np.flatnonzero(fits)
    rows = [(short, np.zeros_like(short), lengths[short], np.zeros_like(short))]
    extra = [p for doc in np.flatnonzero(~fits) for p in _cut_one(store, int(doc), seq_len, overlong, counts)]
    if extra:
        rows.append(tuple(np.asarray(column, dtype=np.int64) for column in zip(*extra)))
    doc, start, end, prefix = (np.concatenate(column).astype(np.int64) for column in zip(*rows))
    order = np.lexsort((start, doc))  # document order, so pieces do not depend on cutting order
    return Pieces(doc[order], start[order], end[order], prefix[order]), dict(counts)


def pack(lengths: np.ndarray, seq_len: int, packing: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle pieces of the given lengths (each <= seq_len) and group them into sequences.

    Returns one array of piece indices per sequence, in a shuffled order; every piece is in
    exactly one sequence.
    """
    return pack_rows(lengths, seq_len, packing, rng)[0]


def pack_rows(lengths: np.ndarray, seq_len: int, packing: str, rng: np.random.Generator,
              reserved: np.ndarray | None = None, overflow: bool = True) -> tuple[list[np.ndarray], np.ndarray, int]:
    """`pack`, with rows that start out holding something else: row j of `reserved` (lengths)
    keeps reserved[j] tokens and the pieces fill the rest. overflow=False: pieces that fit no
    reserved row are left out instead of opening rows of their own.

    Returns (piece indices per row, the reserved index of each row or -1, pieces left out); the
    rows in a shuffled order.
    """
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a piece of {int(lengths.max())} tokens does not fit seq_len={seq_len}")
    reserved = np.zeros(0, dtype=np.int64) if reserved is None else np.asarray(reserved, dtype=np.int64)
    order = rng.permutation(len(lengths))
    sizes = lengths[order].tolist()
    bins: list[list[int]] = [[] for _ in range(len(reserved))]
    rooms = (seq_len - reserved).tolist()
    left_out = 0
    if packing == "greedy":
        current, room = (0, rooms[0]) if rooms else (-1, 0)
        for piece, size in zip(order.tolist(), sizes):
            while size > room:   # next fit: the open row is closed, the next one opened
                if current + 1 < len(rooms):
                    current += 1
                    room = rooms[current]
                elif overflow:
                    bins.append([])
                    current, room = len(bins) - 1, seq_len
                else:
                    break
            if size > room:
                left_out += 1
                continue
            bins[current].append(piece)
            room -= size
    else:
        # the open sequences, as (room left, sequence index) sorted by room: the best fit for a
        # piece is the first one with enough room
        open_bins: list[tuple[int, int]] = sorted((room, i) for i, room in enumerate(rooms) if room > 0)
        for piece, size in zip(order.tolist(), sizes):
            at = bisect_left(open_bins, (size, -1))
            if at < len(open_bins):
                room, index = open_bins.pop(at)
            elif overflow:
                room, index = seq_len, len(bins)
                bins.append([])
            else:
                left_out += 1
                continue
            bins[index].append(piece)
            if room - size > 0:
                insort(open_bins, (room - size, index))
    permutation = rng.permutation(len(bins))
    rows = [np.asarray(bins[i], dtype=np.int64) for i in permutation]
    reserved_of_row = np.where(permutation < len(reserved), permutation, -1).astype(np.int64)
    return rows, reserved_of_row, left_out


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    total = int(lengths.sum())
    run_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - run_starts, lengths) + np.arange(total, dtype=np.int64)


def assemble(store: TokenStore, pieces: Pieces, piece_ids: np.ndarray, seq_len: int, pad_id: int,
             span: str = "document", lead: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The arrays of one packed sequence of exactly seq_len tokens.

    Returns input_ids, labels, position_ids ([seq_len] int64), doc_lengths (the pieces'
    lengths, then the padding's when there is any) and tokens (how many are data, not padding). The padding is cut into documents no longer
    than the row's longest piece: attention over one long padding document would cost its length
    squared (at 512K tokens with 30 % padding, two thirds of a step) and set the row's max_seqlen.

    `lead` (tokens, loss mask): a document that opens the row before the pieces (a long example).
    span="row": the data is one attention span (one document, positions 0.. through it): the
    pieces see each other, each ending in its own separator (a text's end-of-sequence token, a
    conversation's end-of-turn), and the first token of a piece is trained when its mask says so.
    """
    if span not in ATTENTION_SPANS:
        raise ValueError(f"unknown attention span {span!r}; expected one of {ATTENTION_SPANS}")
    lead_tokens = np.zeros(0, dtype=np.int64) if lead is None else np.asarray(lead[0], dtype=np.int64)
    lead_mask = np.zeros(0, dtype=np.int8) if lead is None else np.asarray(lead[1])
    base = store.offsets[pieces.doc[piece_ids]]
    prefix, start, end = pieces.prefix[piece_ids], pieces.start[piece_ids], pieces.end[piece_ids]
    # two segments per piece: the copied prefix (maybe empty) and the body
    seg_starts = np.stack([base, base + start], axis=1).reshape(-1)
    seg_lengths = np.stack([prefix, end - start], axis=1).reshape(-1)
    seg_trained = np.tile(np.array([False, True]), len(piece_ids))
    index = _ragged_arange(seg_starts, seg_lengths)
    doc_lengths = prefix + end - start
    if lead is not None:
        doc_lengths = np.concatenate([[len(lead_tokens)], doc_lengths]).astype(np.int64)
    used = int(doc_lengths.sum())
    if used > seq_len:
        raise ValueError(f"pieces of {used} tokens do not fit seq_len={seq_len}")

    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[:used] = np.concatenate([lead_tokens, store.tokens[index]])
    trained = np.concatenate([lead_mask != 0, np.repeat(seg_trained, seg_lengths) & (store.loss_mask[index] != 0)])
    labels[:used] = np.where(trained, input_ids[:used], IGNORE_INDEX)
    doc_starts = np.cumsum(doc_lengths) - doc_lengths
    if span == "row":
        doc_lengths, doc_starts = doc_lengths[:0], doc_starts[:0]
        if used:
            doc_lengths, doc_starts = np.array([used], dtype=np.int64), np.zeros(1, dtype=np.int64)
        labels[0] = IGNORE_INDEX
    else:
        labels[doc_starts[doc_lengths > 0]] = IGNORE_INDEX  # its target would be the previous document's
    if used < seq_len:
        pad_doc = max(int(doc_lengths.max(initial=0)), 1)
        pad_lengths = np.full(-(-(seq_len - used) // pad_doc), pad_doc, dtype=doc_lengths.dtype)
        pad_lengths[-1] = seq_len - used - pad_doc * (len(pad_lengths) - 1)
        doc_starts = np.append(doc_starts, used + np.cumsum(pad_lengths) - pad_lengths)
        doc_lengths = np.append(doc_lengths, pad_lengths)
    position_ids = np.arange(seq_len, dtype=np.int64) - np.repeat(doc_starts, doc_lengths)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "doc_lengths": doc_lengths, "tokens": used}
