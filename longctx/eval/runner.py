"""Run the retrieval tasks on a model: prompts -> greedy answers -> scored results.

Prompts are wrapped for the model: "plain" (the begin-of-text token, then the text: a base model
continues "Answer: <") or "llama3" (one user turn, then the assistant header: a chat model).
Every rank of a sequence-parallel group runs the same samples and gets the same results.
"""
from __future__ import annotations

import time

import torch

from longctx.data.template import render_llama3
from longctx.model.llama import Llama

from .decode import greedy_generate
from .scoring import score_answer
from .tasks import Haystack, Sample, fit_line_retrieval, make_needle

PROMPT_FORMATS = ("plain", "llama3")


def encode_prompt(tokenizer, text: str, prompt_format: str = "plain") -> list[int]:
    """Token ids of the prompt as the model reads it."""
    if prompt_format == "plain":
        ids = tokenizer.encode(text, add_special_tokens=False)
        bos = getattr(tokenizer, "bos_token_id", None)
        return ([bos] if bos is not None else []) + ids
    if prompt_format == "llama3":
        chat = render_llama3([{"role": "user", "content": text}]).text
        chat += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return tokenizer.encode(chat, add_special_tokens=False)
    raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {PROMPT_FORMATS}")


def answer_samples(model: Llama, tokenizer, samples: list[Sample], max_new_tokens: int = 12,
                   prompt_format: str = "plain", eos_token_id=None, log=None) -> list[dict]:
    """Greedy answers to `samples`, scored: one result dict per sample."""
    device = next(model.parameters()).device
    results = []
    for sample in samples:
        ids = encode_prompt(tokenizer, sample.prompt, prompt_format)
        start = time.perf_counter()
        new = greedy_generate(model, torch.tensor([ids], device=device), max_new_tokens,
                              eos_token_id=eos_token_id)[0].tolist()
        generated = tokenizer.decode(new)
        result = {"task": sample.task, "length": sample.meta.get("length", len(ids)), "tokens": len(ids),
                  "depth": round(sample.depth, 4), "answer": sample.answer, "generated": generated,
                  "correct": score_answer(generated, sample.answer), "seconds": time.perf_counter() - start}
        result.update({k: v for k, v in sample.meta.items() if k in ("asked_depth", "line", "num_lines",
                                                                       "haystack_repeated", "seed")})
        results.append(result)
        if log:
            log(f"{sample.task} length {result['length']} depth {result['depth']:.2f}: "
                f"{'ok ' if result['correct'] else 'NO '} answer {sample.answer} generated {generated!r}")
    return results


def line_retrieval_samples(tokenizer, lengths: list[int], depths: list[float], samples_per_cell: int,
                           seed: int = 0, **kwargs) -> list[Sample]:
    """A line-retrieval sample for every (length, depth, repeat), lengths in prompt tokens."""
    samples = []
    for length in lengths:
        hint = None
        for depth in depths:
            for repeat in range(samples_per_cell):
                samples.append(fit_line_retrieval(tokenizer, length, depth, seed * 100003 + repeat,
                                                  lines_hint=hint, **kwargs))
                hint = samples[-1].meta["num_lines"]
    return samples


def needle_samples(haystack: Haystack, lengths: list[int], depths: list[float], samples_per_cell: int,
                   seed: int = 0, **kwargs) -> list[Sample]:
    """A needle sample for every (length, depth, repeat); the `depth` of a result is where the
    needle landed (the start of a sentence), `asked_depth` the grid's value."""
    return [make_needle(haystack, length, depth, seed * 100003 + repeat, **kwargs)
            for length in lengths for depth in depths for repeat in range(samples_per_cell)]
