"""data.format=text: plain documents from JSON Lines, parquet and a datasets folder give the same
tokens (the tokenizer's own, then end-of-sequence), the loss on every token, documents longer than
seq_len cut into seq_len pieces with nothing dropped, and attention_span=row rows of one span."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from longctx.data import DataConfig, DataError, build_loader, prepare
from longctx.data.cache import cache_path
from longctx.data.sharegpt import read_sharegpt, resolve_path

SEQ_LEN = 1024


@pytest.fixture(scope="module")
def texts():
    """Long documents of real text: the sample's replies strung together, some over 3 x SEQ_LEN."""
    conversations, _ = read_sharegpt("data/sharegpt_sample.json")
    replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    return ["\n\n".join(replies[i:i + size]) for i, size in zip(range(0, 120, 12), [1, 2, 12, 3, 12, 1, 6, 12, 2, 4])]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_path("data/tokenizer")))


@pytest.fixture(scope="module")
def files(texts, tmp_path_factory):
    import datasets
    folder = tmp_path_factory.mktemp("text_data")
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "source": "sample"}) + "\n" for t in texts))
    parquet = folder / "docs.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(parquet))
    saved = folder / "saved"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(saved))
    return {"jsonl": (jsonl, "text"), "parquet": (parquet, "text"), "datasets": (saved, "body")}


def text_config(path, field, cache_dir, **extra) -> DataConfig:
    return DataConfig(path=str(path), format="text", text_field=field, cache_dir=str(cache_dir), verbose=False, **extra)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_every_layout_gives_the_tokenizers_tokens(kind, files, texts, tokenizer, tmp_path):
    path, field = files[kind]
    store = prepare(text_config(path, field, tmp_path)).store
    assert len(store) == len(texts)
    for d, text in enumerate(texts):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        got = store.tokens[store.offsets[d]:store.offsets[d + 1]]
        assert got.tolist() == expected
        assert store.loss_mask[store.offsets[d]:store.offsets[d + 1]].all()


def test_long_documents_are_cut_into_seq_len_pieces(files, texts, tokenizer, tmp_path):
    path, field = files["jsonl"]
    cfg = text_config(path, field, tmp_path)
    loader = build_loader(cfg, seq_len=SEQ_LEN)
    store, pieces = loader.store, loader.pieces
    assert (store.lengths > 3 * SEQ_LEN).any()
    for d in range(len(store)):   # each document's pieces tile it: nothing dropped
        mine = np.flatnonzero(pieces.doc == d)
        assert pieces.start[mine].tolist() == list(range(0, int(store.lengths[d]), SEQ_LEN))
        assert pieces.end[mine][-1] == store.lengths[d]
    # one epoch of rows holds every token of the data once, with labels on all but span starts
    tokens, trained = 0, 0
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        assert batch["input_ids"].shape == (1, SEQ_LEN)
        tokens += int(batch["num_tokens"])
        cu = batch["cu_seqlens"].tolist()
        labels, ids = batch["labels"][0], batch["input_ids"][0]
        data = torch.zeros(SEQ_LEN, dtype=torch.bool)
        data[:int(batch["num_tokens"])] = True
        span_starts = torch.zeros(SEQ_LEN, dtype=torch.bool)
        span_starts[cu[:-1]] = True
        assert torch.equal(labels != -100, data & ~span_starts)
        assert torch.equal(labels[labels != -100], ids[labels != -100])
        trained += int((labels != -100).sum())
    assert tokens == int(store.lengths.sum())


def test_row_span_concatenates_documents_into_one_span(files, tmp_path):
    path, field = files["jsonl"]
    loader = build_loader(text_config(path, field, tmp_path, attention_span="row"), seq_len=SEQ_LEN, micro_batch=2)
    eos = None
    for _ in range(4):
        batch = next(loader)
        cu = batch["cu_seqlens"].tolist()
        for r in range(2):
            used = int((batch["position_ids"][r] == torch.arange(SEQ_LEN)).sum())
            inside = [c - r * SEQ_LEN for c in cu if r * SEQ_LEN < c < r * SEQ_LEN + used]
            assert inside == []                              # no boundary inside the data
            ids, labels = batch["input_ids"][r, :used], batch["labels"][r, :used]
            assert (labels[1:] == ids[1:]).all()             # every token after the first is trained
            eos = eos if eos is not None else prepare(text_config(path, field, tmp_path)).store.tokens[-1]
            ends = (ids == int(eos)).nonzero().flatten().tolist()
            # a document that ends inside the row is followed by the next one in the same span
            assert all(e + 1 == used or batch["position_ids"][r, e + 1] == e + 1 for e in ends)


def test_text_cache_key_and_errors(files, tmp_path):
    path, _ = files["jsonl"]
    keys = {cache_path(text_config(path, "text", tmp_path)), cache_path(text_config(path, "source", tmp_path)),
            cache_path(dataclasses.replace(text_config(path, "text", tmp_path), format="sharegpt"))}
    assert len(keys) == 3
    with pytest.raises(DataError, match=r'none of its 10 records .*skipped: no_body_field 10.*point data.path at such data, or set data.text_field'):
        prepare(text_config(path, "body", tmp_path))
