"""Packing on synthetic documents whose tokens are their own global index, so every token can be
traced to where it came from."""
import numpy as np
import pytest
import torch

from longctx.data import IGNORE_INDEX, PackedLoader, TokenStore
from longctx.data.packing import assemble, cut_documents, pack

PAD = -1


def synthetic_store(rng, docs, max_exchanges=5, max_user=200, max_reply=400, all_loss=False):
    """Documents of a prefix (begin-of-text + system) then exchanges of a user turn (no loss) and a
    reply (loss); every token counts with all_loss; token values are global positions."""
    ids, masks, starts, total = [], [], [], 0
    for _ in range(docs):
        mask = [0] * int(rng.integers(1, 20))
        exchange_starts = []
        for _ in range(int(rng.integers(1, max_exchanges + 1))):
            exchange_starts.append(len(mask))
            mask += [0] * int(rng.integers(5, max_user)) + [1] * int(rng.integers(1, max_reply))
        ids.append(np.arange(total, total + len(mask)))
        masks.append([1] * len(mask) if all_loss else mask)
        starts.append(exchange_starts)
        total += len(mask)
    return TokenStore.from_lists(ids, masks, starts)


def check_sequence(store, row, labels, positions, doc_lengths, seq_len):
    """Documents are contiguous runs of one document's tokens (a copied prefix, then a body),
    positions restart at each, labels are the token or -100 by the mask, padding only at the end,
    in documents no longer than the row's longest real one."""
    assert len(row) == seq_len and int(doc_lengths.sum()) == seq_len
    bounds = np.concatenate([[0], np.cumsum(doc_lengths)])
    real = [end - begin for begin, end in zip(bounds[:-1], bounds[1:]) if row[begin] != PAD]
    for begin, end in zip(bounds[:-1], bounds[1:]):
        tokens = row[begin:end]
        np.testing.assert_array_equal(positions[begin:end], np.arange(end - begin))
        assert labels[begin] == IGNORE_INDEX  # predicting it would cross a document boundary
        if tokens[0] == PAD:
            assert (row[begin:] == PAD).all() and (labels[begin:] == IGNORE_INDEX).all()
            assert end - begin <= max(real)
            continue
        doc = int(np.searchsorted(store.offsets, tokens[0], side="right") - 1)
        local = tokens - store.offsets[doc]
        breaks = np.flatnonzero(np.diff(local) != 1)
        assert len(breaks) <= 1, "a document is a prefix copy and one contiguous body"
        if len(breaks):  # a continuation: the prefix (trained on never again) then an exchange
            body = breaks[0] + 1
            np.testing.assert_array_equal(local[:body], np.arange(body))
            assert local[body] in store.exchanges(doc)
            assert (labels[begin:begin + body] == IGNORE_INDEX).all()
        else:
            body = 0
        assert local[-1] < store.lengths[doc]
        counted = store.loss_mask[tokens[body:]] == 1
        expected = np.where(counted, tokens[body:], IGNORE_INDEX)
        expected[0] = IGNORE_INDEX if body == 0 else expected[0]
        np.testing.assert_array_equal(labels[begin + body:end], expected)


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_pack_puts_every_piece_in_exactly_one_sequence(packing):
    rng = np.random.default_rng()
    seq_len = 1000
    lengths = rng.integers(1, seq_len + 1, size=500)
    sequences = pack(lengths, seq_len, packing, np.random.default_rng(7))
    placed = np.concatenate(sequences)
    np.testing.assert_array_equal(np.sort(placed), np.arange(len(lengths)))
    assert all(lengths[s].sum() <= seq_len for s in sequences)
    again = pack(lengths, seq_len, packing, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(sequences, again)) and len(again) == len(sequences)


def test_best_fit_pads_less_than_greedy():
    rng = np.random.default_rng()
    lengths = rng.integers(1, 2048, size=2000)
    greedy = pack(lengths, 2048, "greedy", np.random.default_rng(1))
    best = pack(lengths, 2048, "best_fit", np.random.default_rng(1))
    assert len(best) < len(greedy)
    assert len(best) <= 1.1 * lengths.sum() / 2048


@pytest.mark.parametrize("overlong", ["split", "truncate"])
def test_overlong_documents_are_cut_at_user_turns(overlong):
    rng = np.random.default_rng()
    store = synthetic_store(rng, 60, max_exchanges=8, max_user=150, max_reply=300)
    seq_len = 600
    pieces, counts = cut_documents(store, seq_len, overlong)
    assert counts["overlong_documents"] == int((store.lengths > seq_len).sum()) > 0
    assert (pieces.lengths <= seq_len).all() and (pieces.lengths > 0).all()
    for doc in range(len(store)):
        mine = np.flatnonzero(pieces.doc == doc)
        exchanges = store.exchanges(doc)
        if store.lengths[doc] <= seq_len:
            assert len(mine) == 1 and pieces.start[mine[0]] == 0 and pieces.end[mine[0]] == store.lengths[doc]
            continue
        if overlong == "truncate":
            assert len(mine) <= 1
        assert all(pieces.start[p] == 0 or pieces.start[p] in exchanges for p in mine), "labels need their question"
        assert all(pieces.prefix[p] in (0, exchanges[0]) for p in mine)
        assert all(store.loss_count(doc, pieces.start[p], pieces.end[p]) > 0 for p in mine)
        if overlong == "split":  # every exchange that fits a sequence with the prefix is kept whole, once
            bounds = list(exchanges[1:]) + [store.lengths[doc]]
            for start, end in zip(exchanges, bounds):
                if exchanges[0] + end - start <= seq_len:
                    holders = [p for p in mine if pieces.start[p] <= start and end <= pieces.end[p]]
                    assert len(holders) == 1


@pytest.mark.parametrize("packing, overlong, all_loss", [("best_fit", "split", False),
                                                          ("greedy", "truncate", False),
                                                          ("best_fit", "split", True)])
def test_packed_sequences_keep_documents_apart(packing, overlong, all_loss):
    rng = np.random.default_rng()
    store = synthetic_store(rng, 80, all_loss=all_loss)
    seq_len = 700
    loader = PackedLoader(store, seq_len, micro_batch=2, packing=packing, overlong=overlong, pad_id=PAD)
    for _ in range(5):
        batch = next(loader)
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 2 * seq_len
        assert seq_len in cu.tolist(), "rows are separate documents"
        lengths = np.diff(cu.numpy())
        row_split = int(np.flatnonzero(np.cumsum(lengths) == seq_len)[0]) + 1
        for row, doc_lengths in enumerate((lengths[:row_split], lengths[row_split:])):
            check_sequence(store, batch["input_ids"][row].numpy(), batch["labels"][row].numpy(),
                           batch["position_ids"][row].numpy(), doc_lengths, seq_len)


def test_an_epoch_holds_every_token_once():
    rng = np.random.default_rng()
    store = synthetic_store(rng, 100)
    seq_len = int(store.lengths.max()) + int(rng.integers(0, 500))  # nothing overlong
    loader = PackedLoader(store, seq_len, pad_id=PAD, seed=int(rng.integers(1 << 30)))
    tokens = [next(loader)["input_ids"][0] for _ in range(loader.steps_per_epoch)]
    assert loader.epoch == 0
    seen = np.concatenate(tokens)
    np.testing.assert_array_equal(np.sort(seen[seen != PAD]), np.arange(len(store.tokens)))
    padding = (seen == PAD).mean()
    assert padding == pytest.approx(loader.report["packing"]["padding_fraction"])
    next(loader)
    assert loader.epoch == 1 and loader.consumed == 1


def test_512k_sequences_assemble_without_per_token_loops():
    rng = np.random.default_rng()
    store = synthetic_store(rng, 300, max_exchanges=20, max_user=2000, max_reply=4000)
    seq_len = 512 * 1024
    loader = PackedLoader(store, seq_len, pad_id=PAD, pad_multiple=16)
    for _ in range(2):
        batch = next(loader)
        assert batch["input_ids"].shape == (1, seq_len)
        lengths = np.diff(batch["cu_seqlens"].numpy())
        check_sequence(store, batch["input_ids"][0].numpy(), batch["labels"][0].numpy(),
                       batch["position_ids"][0].numpy(), lengths, seq_len)


def test_assemble_rejects_overfull_and_loader_checks_its_arguments():
    store = TokenStore.from_lists([np.arange(10)], [[0] * 5 + [1] * 5], [[1]])
    pieces, _ = cut_documents(store, 10)
    with pytest.raises(ValueError, match="do not fit"):
        assemble(store, pieces, np.array([0]), 8, PAD)
    with pytest.raises(ValueError, match="multiple of pad_multiple=4"):
        PackedLoader(store, 10, pad_multiple=4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedLoader(store, 10, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one step"):
        PackedLoader(store, 16, dp_size=2)
