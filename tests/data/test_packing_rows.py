"""pack_rows with reserved rows (the long examples' rows) and assemble with a leading document and
attention_span=row, on synthetic documents whose tokens are their own global index."""
import numpy as np
import pytest

from longctx.data import IGNORE_INDEX
from longctx.data.packing import assemble, cut_documents, pack, pack_rows

from test_packing import PAD, synthetic_store

SEQ_LEN = 1000


@pytest.mark.parametrize("packing", ["best_fit", "greedy"])
def test_reserved_rows_take_their_room_and_pieces_fill_the_rest(packing):
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 400, size=300)
    reserved = rng.integers(200, SEQ_LEN + 1, size=40)
    rows, owner, left_out = pack_rows(lengths, SEQ_LEN, packing, np.random.default_rng(1), reserved)
    assert left_out == 0
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))     # every piece once
    assert sorted(owner[owner >= 0].tolist()) == list(range(len(reserved)))         # every reserved row once
    for row, own in zip(rows, owner):
        assert lengths[row].sum() + (reserved[own] if own >= 0 else 0) <= SEQ_LEN
    # no overflow: pieces only go where reserved rows have room; the others are counted, not placed
    rows, owner, left_out = pack_rows(lengths, SEQ_LEN, packing, np.random.default_rng(1), reserved, overflow=False)
    assert len(rows) == len(reserved) and (owner >= 0).all()
    placed = np.concatenate(rows)
    assert len(set(placed.tolist())) == len(placed) and len(placed) + left_out == len(lengths)
    assert all(lengths[row].sum() + reserved[own] <= SEQ_LEN for row, own in zip(rows, owner))


@pytest.mark.parametrize("packing", ["best_fit", "greedy"])
def test_without_reserved_rows_packing_is_unchanged(packing):
    # the same rows as `pack` (which resumed runs rely on), and no reserved row
    lengths = np.random.default_rng(2).integers(10, 400, size=200)
    rows, owner, left_out = pack_rows(lengths, SEQ_LEN, packing, np.random.default_rng(3))
    again = pack(lengths, SEQ_LEN, packing, np.random.default_rng(3))
    assert [r.tolist() for r in rows] == [r.tolist() for r in again]
    assert (owner == -1).all() and left_out == 0


def test_assemble_with_a_lead_and_one_span_per_row():
    rng = np.random.default_rng(4)
    store = synthetic_store(rng, 12, max_exchanges=2, max_user=40, max_reply=60)
    pieces, _ = cut_documents(store, SEQ_LEN)
    ids = np.arange(4)
    lead_tokens = np.arange(10_000, 10_300)
    lead_mask = (np.arange(300) >= 280).astype(np.int8)          # the answer at its end
    document = assemble(store, pieces, ids, SEQ_LEN, PAD, lead=(lead_tokens, lead_mask))
    row = assemble(store, pieces, ids, SEQ_LEN, PAD, span="row", lead=(lead_tokens, lead_mask))
    # the reference: the lead, then each piece's tokens, in order
    body = np.concatenate([store.tokens[store.offsets[d] + s:store.offsets[d] + e]
                           for d, s, e in zip(pieces.doc[ids], pieces.start[ids], pieces.end[ids])])
    body_mask = np.concatenate([store.loss_mask[store.offsets[d] + s:store.offsets[d] + e]
                                for d, s, e in zip(pieces.doc[ids], pieces.start[ids], pieces.end[ids])])
    used = 300 + len(body)
    for out in (document, row):
        assert out["tokens"] == used and len(out["input_ids"]) == SEQ_LEN
        np.testing.assert_array_equal(out["input_ids"][:used], np.concatenate([lead_tokens, body]))
        assert (out["input_ids"][used:] == PAD).all() and (out["labels"][used:] == IGNORE_INDEX).all()
    # document spans: the lead is one, each piece one, labels cut at every start
    assert document["doc_lengths"][0] == 300 and document["doc_lengths"][:5].sum() == used
    # one span: the data is a single document with positions straight through; labels follow the
    # mask everywhere but the row's first token
    assert row["doc_lengths"][0] == used and row["doc_lengths"][1:].sum() == SEQ_LEN - used
    np.testing.assert_array_equal(row["position_ids"][:used], np.arange(used))
    expected = np.where(np.concatenate([lead_mask, body_mask]) != 0, row["input_ids"][:used], IGNORE_INDEX)
    expected[0] = IGNORE_INDEX
    np.testing.assert_array_equal(row["labels"][:used], expected)
    starts = np.cumsum(document["doc_lengths"][:5]) - document["doc_lengths"][:5]
    expected_doc = expected.copy()
    expected_doc[starts] = IGNORE_INDEX
    np.testing.assert_array_equal(document["labels"][:used], expected_doc)
