"""Sequence-parallel evaluation on 2 gloo processes (ring prefill, distributed KV cache) against
one process: the same logits after the prompt and at every decode step, the same greedy tokens,
the same loss by position. Prompt lengths that divide by 2 x ranks and that need padding."""
import pytest
import torch

from distributed import run_distributed
from longctx.eval.decode import decode_step, greedy_generate, prefill
from longctx.eval.perplexity import token_losses
from longctx.model import Llama, ModelConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is ~40x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CONFIG = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, rope_theta=10000.0, bos_token_id=0, eos_token_id=1)
LENGTHS = (40, 37, 6)      # 40 divides by 4; 37 and 6 are padded with a separate document
STEPS = 5


@torch.no_grad()
def evaluate(model, prompts, forced):
    """Per prompt: prefill logits, logits after each forced token, greedy tokens, token losses."""
    out = []
    for ids, tokens in zip(prompts, forced):
        logits, cache = prefill(model, ids)
        steps = [logits]
        for t in tokens:
            steps.append(decode_step(model, t.view(1, 1), cache))
        out.append({"logits": torch.stack(steps), "greedy": greedy_generate(model, ids, STEPS),
                    "losses": token_losses(model, ids, chunk_size=16)})
    return out


def _worker(rank, world_size, state, prompts, forced):
    from longctx.parallel.sequence import set_sequence_group
    set_sequence_group(None)
    model = Llama(ModelConfig(**CONFIG, attention="ring")).double().eval()
    model.load_state_dict(state)
    return evaluate(model, prompts, forced)


def test_ring_prefill_and_decoding_match_one_process():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**CONFIG)).double().eval()
    gen = torch.Generator().manual_seed(torch.seed() % 2 ** 31)   # fresh prompts every run
    prompts = [torch.randint(2, CONFIG["vocab_size"], (1, n), generator=gen) for n in LENGTHS]
    forced = [torch.randint(2, CONFIG["vocab_size"], (STEPS,), generator=gen) for _ in LENGTHS]
    expected = evaluate(model, prompts, forced)
    ranks = run_distributed(_worker, 2, model.state_dict(), prompts, forced)
    for rank, results in enumerate(ranks):
        for n, got, want in zip(LENGTHS, results, expected):
            assert got["logits"].shape == want["logits"].shape == (STEPS + 1, 1, CONFIG["vocab_size"])
            assert torch.allclose(got["logits"], want["logits"], rtol=1e-9, atol=1e-9), (rank, n)
            assert torch.equal(got["greedy"], want["greedy"]), (rank, n)
            assert got["losses"].shape == (1, n - 1)
            assert torch.allclose(got["losses"], want["losses"], rtol=1e-9, atol=1e-9), (rank, n)
