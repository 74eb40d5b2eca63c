"""Plain-text long documents (data.format=text): continued pretraining, the loss on every token.

    texts, report = read_text_documents("books.jsonl")      # a `text` field per record
    columns = tokenize_texts(texts, tokenizer)              # the columns tokenize_conversations gives
    pieces, counts = cut_text_documents(store, seq_len)     # seq_len pieces, none dropped

Accepted input, read by the same reader as ShareGPT (`iter_raw_records`): JSON Lines or a JSON list
of objects with a text field (data.text_field, default "text"), a .parquet/.arrow/.csv file, a
folder of such shards, or a `datasets` folder written by `save_to_disk`.

Each document is tokenized whole and ends with the tokenizer's end-of-sequence token: it separates
documents that share an attention span (data.attention_span=row) and teaches where a document ends.
Long-context recipes (ProLong, "How to Train Long-Context Language Models (Effectively)") start
from such long documents; a document longer than seq_len is cut into consecutive seq_len pieces
rather than dropped, so a book of 300K tokens at seq_len 64K gives four full rows and a remainder.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from .packing import Pieces, TokenStore
from .sharegpt import iter_raw_records, new_report, resolve_path


def read_text_documents(path: str | os.PathLike, field: str = "text") -> tuple[list[str], dict]:
    """The non-empty `field` strings of every record under `path`, in order, and a report like
    read_sharegpt's (records, kept, skipped by reason)."""
    path = resolve_path(path)
    report = new_report()
    texts: list[str] = []
    skipped: Counter = Counter()
    for record in iter_raw_records(path, report):
        report["records"] += 1
        if not isinstance(record, dict):
            skipped["not_an_object"] += 1
            continue
        if field not in record:
            skipped[f"no_{field}_field"] += 1
            continue
        text = record[field]
        if not isinstance(text, str):
            skipped[f"{field}_not_a_string"] += 1
        elif not text.strip():
            skipped[f"empty_{field}"] += 1
        else:
            texts.append(text)
    report["kept"] = len(texts)
    report["skipped"] = dict(skipped)
    report["repaired"] = {}
    return texts, report


def end_of_text_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("data.format=text ends every document with the tokenizer's end-of-sequence token, "
                         "and this tokenizer has none; set eos_token in its tokenizer_config.json")
    return int(tokenizer.eos_token_id)


def tokenize_texts(texts: list[str], tokenizer) -> dict[str, list]:
    """Tokenize a batch of documents (the `datasets.map` function): every token counts for the
    loss; the end-of-sequence token closes each document. The columns match tokenize_conversations'
    (exchange_starts is empty: a text has no turns to cut at)."""
    from .template import _encode

    eos = end_of_text_id(tokenizer)
    columns = {"input_ids": [], "loss_mask": [], "exchange_starts": [], "length": [], "loss_tokens": []}
    for ids, _ in _encode(tokenizer, list(texts)):
        ids = np.append(ids, np.int32(eos)).astype(np.int32)
        columns["input_ids"].append(ids)
        columns["loss_mask"].append(np.ones(len(ids), dtype=np.int8))
        columns["exchange_starts"].append(np.zeros(0, dtype=np.int32))
        columns["length"].append(len(ids))
        columns["loss_tokens"].append(len(ids))
    return columns


def cut_text_documents(store: TokenStore, seq_len: int) -> tuple[Pieces, dict]:
    """Every document as consecutive pieces of seq_len tokens (the last one shorter). A piece of
    a single token is dropped: its only token is the first of its span, which no label predicts."""
    lengths = store.lengths
    counts = np.maximum(-(-lengths // seq_len), 1)               # pieces per document
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(len(doc), dtype=np.int64) - first_piece) * seq_len
    end = np.minimum(start + seq_len, lengths[doc])
    keep = end - start >= 2
    report = {"overlong_documents": int((lengths > seq_len).sum()),
              "pieces_from_overlong": int(counts[lengths > seq_len].sum())}
    if (~keep).any():
        report["one_token_piece_dropped"] = int((~keep).sum())
    zeros = np.zeros(int(keep.sum()), dtype=np.int64)
    return Pieces(doc[keep], start[keep], end[keep], zeros), report
