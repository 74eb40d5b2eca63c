"""Sequence-parallel evaluation on 2 gloo processes (prefill under each registered method, distributed
cache) against one process: the same logits after the prompt and at every decode step, the same greedy tokens,
the same loss by position. Prompt lengths that divide by 2 x ranks and that need padding."""
import pytest
import torch

from distributed import run_distributed
from longctx.eval.decode import decode_step, greedy_generate, prefill
from longctx.eval.perplexity import token_losses
from longctx.model import Llama, ModelConfig


CONFIG = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, rope_theta=10000.0, bos_token_id=0, eos_token_id=1)
LENGTHS = (40, 37, 6)      # 40 divides by every method's divisor; 37 (and 6 under most) are padded
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


HYBRID = dict(layer_types=["linear", "softmax", "linear"], num_hidden_layers=3)
ONE_PROCESS = dict(attention="sdpa", linear_attention="lightning")
# method -> (the model it evaluates, its dtype, processes, extra ParallelDims arguments, tolerance):
# float64 throughout for ring and USP; LASP and the lightning kernel keep their states in fp32;
# Ulysses runs the flash kernel (no float64) over whole sequences
METHODS = {"ring": (dict(ONE_PROCESS), torch.float64, 2, {}, 1e-9),
           "lasp": (dict(HYBRID, **ONE_PROCESS), torch.float64, 2, {}, 1e-5),
           "lasp_allgather": (dict(HYBRID, **ONE_PROCESS), torch.float64, 2, {}, 1e-5),
           "ulysses": (dict(HYBRID, **ONE_PROCESS), torch.float32, 2, {}, 1e-4),
           "usp": (dict(ONE_PROCESS), torch.float64, 4, {"ulysses": 2}, 1e-9)}


def _worker(rank, world_size, cases):
    from longctx.parallel.mesh import sequence_dims
    from longctx.parallel.parallelize import apply_sequence_parallel
    results = {}
    for name, (state, prompts, forced) in cases.items():
        shape, dtype, _, extra, _ = METHODS[name]
        model = Llama(ModelConfig(**{**CONFIG, **shape})).to(dtype).eval()
        model.load_state_dict(state)
        apply_sequence_parallel(model, sequence_dims(name, **extra))
        results[name] = evaluate(model, prompts, forced)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_prefill_and_decoding_match_one_process(world):
    """Every registered method (those of `world` processes): ring (zigzag shares) and USP on a
    softmax model; LASP (+ allgather_kv) and Ulysses on a hybrid."""
    from longctx.parallel.registry import methods
    assert set(METHODS) == set(methods())
    names = [name for name, case in METHODS.items() if case[2] == world]
    gen = torch.Generator().manual_seed(torch.seed() % 2 ** 31)   # fresh prompts and weights every run
    cases, expected = {}, {}
    for name in names:
        shape, dtype = METHODS[name][:2]
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        model = Llama(ModelConfig(**{**CONFIG, **shape})).to(dtype).eval()
        prompts = [torch.randint(2, CONFIG["vocab_size"], (1, n), generator=gen) for n in LENGTHS]
        forced = [torch.randint(2, CONFIG["vocab_size"], (STEPS,), generator=gen) for _ in LENGTHS]
        cases[name] = (model.state_dict(), prompts, forced)
        expected[name] = evaluate(model, prompts, forced)
    ranks = run_distributed(_worker, world, cases)
    for rank, by_name in enumerate(ranks):
        for name, n, got, want in ((name, n, got, want) for name in names
                                   for n, got, want in zip(LENGTHS, by_name[name], expected[name])):
            tol = METHODS[name][4]
            assert got["logits"].shape == want["logits"].shape == (STEPS + 1, 1, CONFIG["vocab_size"])
            assert torch.allclose(got["logits"], want["logits"], rtol=tol, atol=tol), (name, rank, n)
            assert torch.equal(got["greedy"], want["greedy"]), (name, rank, n)
            assert got["losses"].shape == (1, n - 1)
            assert torch.allclose(got["losses"], want["losses"], rtol=tol, atol=tol), (name, rank, n)
