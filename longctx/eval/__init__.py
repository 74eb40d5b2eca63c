"""Long-context evaluation: line retrieval, needle in a haystack, loss by token position.

    from longctx.eval import fit_line_retrieval, answer_samples, accuracy_by
    samples = [fit_line_retrieval(tokenizer, 32768, depth, seed) for depth in (0.0, 0.5, 1.0) for seed in range(4)]
    results = answer_samples(model, tokenizer, samples)      # greedy, KV-cached; scored
    accuracy_by(results, "length", "asked_depth")

Sequence parallel: `apply_sequence_parallel(model, sequence_dims("ring"))` (longctx.parallel.parallelize
and .mesh; any registered method), and call the same functions on every rank of the group with the
same prompts. `python -m longctx.eval` runs all of it from the command line (settings:
longctx/eval/config.py, `--help`). Figures (`longctx.eval.plots`) need matplotlib.
"""
from .decode import KVCache, decode_step, greedy_generate, prefill
from .perplexity import bucket_edges, conversation_sequences, loss_by_position, packed_sequences, token_losses
from .runner import answer_samples, encode_prompt, line_retrieval_samples, needle_samples, passkey_samples
from .scoring import accuracy_by, accuracy_grid, first_number, score_answer
from .tasks import (Haystack, Sample, fit_line_retrieval, fit_passkey, haystack_text, make_line_retrieval,
                    make_needle, make_passkey)

__all__ = ["KVCache", "prefill", "decode_step", "greedy_generate", "token_losses", "loss_by_position",
           "bucket_edges", "packed_sequences", "conversation_sequences", "answer_samples", "encode_prompt",
           "line_retrieval_samples", "needle_samples", "accuracy_by", "accuracy_grid", "first_number",
           "score_answer", "Sample", "Haystack", "haystack_text", "make_line_retrieval", "fit_line_retrieval",
           "make_needle", "make_passkey", "fit_passkey", "passkey_samples"]
