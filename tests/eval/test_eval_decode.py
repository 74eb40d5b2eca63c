"""Greedy decoding with the KV cache against full recomputation, the loss by position against the
model's own loss, and an exported checkpoint generating the same tokens in transformers."""
import math

import pytest
import torch

from longctx.eval.decode import attend_cached, decode_step, greedy_generate, prefill
from longctx.eval.perplexity import bucket_edges, loss_by_position, packed_sequences, token_losses
from longctx.model import Llama, ModelConfig, save_hf


TINY = dict(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, initializer_range=0.3, rope_theta=10000.0, bos_token_id=0, eos_token_id=1)


def random_model(seed=None, **overrides):
    if seed is not None:
        torch.manual_seed(seed)
    return Llama(ModelConfig(**{**TINY, **overrides})).eval()


@torch.no_grad()
def test_prefill_and_decode_steps_match_the_full_forward():
    model = random_model(0)
    model.double()
    ids = torch.randint(0, TINY["vocab_size"], (2, 29))
    logits, cache = prefill(model, ids)
    full = model(ids).logits
    assert torch.allclose(logits, full[:, -1].float(), rtol=1e-5, atol=1e-5)
    assert len(cache.keys) == 2 and cache.keys[0].shape == (2, 29, 2, 8) and cache.length == 29
    for _ in range(4):
        token = torch.randint(0, TINY["vocab_size"], (2, 1))
        logits = decode_step(model, token, cache)
        ids = torch.cat([ids, token], dim=1)
        assert torch.allclose(logits, model(ids).logits[:, -1].float(), rtol=1e-5, atol=1e-5)


def test_cached_greedy_equals_recomputing_greedy():
    for seed in range(3):
        model = random_model(seed)
        ids = torch.randint(2, TINY["vocab_size"], (1, 17 + 11 * seed))
        cached = greedy_generate(model, ids, 10)
        assert cached.shape == (1, 10)
        assert torch.equal(cached, greedy_generate(model, ids, 10, use_cache=False))


def test_greedy_stops_at_end_token_and_checks_arguments():
    model = random_model(0)
    ids = torch.randint(2, TINY["vocab_size"], (1, 9))
    first = greedy_generate(model, ids, 1)[0, 0].item()
    assert greedy_generate(model, ids, 8, eos_token_id=first).shape == (1, 1)
    assert greedy_generate(model, ids, 8, eos_token_id=[first, 5]).shape == (1, 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, 0)
    with pytest.raises(ValueError, match="batch, seqlen"):
        greedy_generate(model, ids[0], 3)


def test_attend_cached_matches_softmax_attention():
    q = torch.randn(2, 1, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 13, 2, 8, dtype=torch.float64), torch.randn(2, 13, 2, 8, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2)
    for cuts in ([], [5], [0, 13], [3, 4, 9]):           # the cache in blocks, some empty
        bounds = [0, *cuts, 13]
        blocks = [(k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        assert torch.allclose(attend_cached(q, blocks, 8 ** -0.5), expected, rtol=1e-10, atol=1e-12), cuts


@torch.no_grad()
def test_linear_attention_layers_decode_from_their_state():
    """A hybrid (linear + softmax layers): the state-carrying decode steps equal full forwards."""
    model = random_model(0, layer_types=["linear", "softmax", "linear"], num_hidden_layers=3).double()
    ids = torch.randint(2, TINY["vocab_size"], (2, 23))
    logits, cache = prefill(model, ids)
    assert cache.keys[0] is None and cache.states[0].shape == (2, 6, 8, 8) and cache.states[1] is None
    assert torch.allclose(logits, model(ids).logits[:, -1].float(), rtol=1e-5, atol=1e-5)
    for _ in range(4):
        token = torch.randint(0, TINY["vocab_size"], (2, 1))
        logits = decode_step(model, token, cache)
        ids = torch.cat([ids, token], dim=1)
        assert torch.allclose(logits, model(ids).logits[:, -1].float(), rtol=1e-5, atol=1e-5)
    model.float()
    assert torch.equal(greedy_generate(model, ids[:1], 6), greedy_generate(model, ids[:1], 6, use_cache=False))


@torch.no_grad()
def test_token_losses_and_buckets_agree_with_the_model_loss():
    model = random_model(1)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    losses = token_losses(model, ids, chunk_size=7)
    assert losses.shape == (1, 39)
    assert torch.allclose(losses.mean(), model(ids, labels=ids).loss, rtol=1e-5)
    edges = bucket_edges(40)
    assert edges == [1, 2, 4, 8, 16, 32, 40]
    sequences = [torch.randint(0, TINY["vocab_size"], (40,)) for _ in range(3)]
    rows = loss_by_position(model, sequences, edges)
    every = torch.cat([token_losses(model, s.view(1, -1))[0] for s in sequences])
    assert sum(r["tokens"] for r in rows) == 3 * 39
    assert math.isclose(sum(r["loss"] * r["tokens"] for r in rows), every.sum().item(), rel_tol=1e-5)
    assert rows[3] == pytest.approx({"start": 8, "end": 16, "tokens": 24, "ppl": math.exp(rows[3]["loss"]),
                                     "loss": torch.cat([token_losses(model, s.view(1, -1))[0, 7:15]
                                                        for s in sequences]).mean().item()})
    assert bucket_edges(100, 4, "linear") == [1, 26, 51, 75, 100]
    with pytest.raises(ValueError, match="unknown bucket scale"):
        bucket_edges(100, scale="cubic")


def test_packed_sequences():
    docs = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([30, 50, 20, 70])]
    sequences = packed_sequences(docs, 40, 3, seed=3)
    assert len(sequences) == 3 and all(s.numel() == 40 for s in sequences)
    flat = torch.cat(sequences).tolist()
    assert sorted(set(flat)) == sorted(flat)       # no token twice
    assert packed_sequences(docs, 40, 3, seed=3)[1].tolist() == sequences[1].tolist()
    assert len(packed_sequences(docs, 40, 10)) == 4
    with pytest.raises(ValueError, match="fewer than one sequence"):
        packed_sequences(docs, 1000, 1)


def test_export_generates_the_same_in_transformers(tmp_path):
    """A tiny model trained a few steps, saved with save_hf: transformers' model.generate decodes
    greedily the same tokens as ours."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = Llama(ModelConfig(**{**TINY, "initializer_range": 0.02}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.arange(2, 14).repeat(4)           # learnable: count 2..13 and wrap
    for _ in range(30):
        start = torch.randint(0, 12, (8,))
        ids = torch.stack([pattern[s:s + 24] for s in start.tolist()])
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.5, loss.item()            # it learned something: generations are not noise
    save_hf(model.eval(), tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ours = greedy_generate(model, prompt, 12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs[0, prompt.shape[1]:], ours[0])
    assert ours[0, :4].tolist() == [11, 12, 13, 2]    # and what it learned
