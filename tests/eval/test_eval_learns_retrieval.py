"""A tiny model trained on line retrieval for a few hundred CPU steps answers far above chance.

The whole evaluation path runs: `make_line_retrieval` prompts, `answer_samples` (prompt encoding,
KV-cached greedy decoding, scoring). The tiny model reads a word-level vocabulary in which each line
`name=value` is one token, so that one attention layer can look a name up (learning the two-layer
induction circuit that separate name and value tokens need takes thousands of steps); the values
are drawn afresh for every prompt, so only reading the context answers the question.
"""
import random

import torch

from longctx.eval.runner import answer_samples
from longctx.eval.scoring import accuracy_by
from longctx.eval.tasks import make_line_retrieval
from longctx.model import Llama, ModelConfig


NAMES = [f"n{i}" for i in range(8)]
WORDS = ["<bos>", "query"] + NAMES + [str(d) for d in range(10)] + [f"{n}={d}" for n in NAMES for d in range(10)]
LINES = 6
TASK = dict(names=NAMES, digits=1, header="", line_template="{name}={value} ", question="query {name}")


class WordTokenizer:
    bos_token_id = 0

    def __init__(self):
        self.ids = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text, add_special_tokens=False):
        return [self.ids[w] for w in text.split()]

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


def training_batch(tokenizer, first_seed, size):
    """Retrieval prompts whose lines are each asked once, in a random order: one label per question."""
    rows, labels = [], []
    for seed in range(first_seed, first_seed + size):
        sample = make_line_retrieval(LINES, 0.0, seed, **TASK)
        lines = sample.prompt.split("query")[0]
        pairs = [w.split("=") for w in lines.split()]
        random.Random(seed).shuffle(pairs)
        row = [tokenizer.bos_token_id] + tokenizer.encode(lines)
        label = [-100] * len(row)
        for name, value in pairs:
            row += tokenizer.encode(f"query {name} {value}")
            label += [-100, -100, row[-1]]
        rows.append(row)
        labels.append(label)
    return torch.tensor(rows), torch.tensor(labels)


def accuracy(model, tokenizer, seeds):
    samples = [make_line_retrieval(LINES, depth / 5, seed, **TASK) for seed in seeds for depth in range(6)]
    results = answer_samples(model.eval(), tokenizer, samples, max_new_tokens=1)
    for r in results:
        r["asked_depth"] = round(r["depth"], 1)
    return sum(r["correct"] for r in results) / len(results), accuracy_by(results, "asked_depth")


def test_tiny_model_learns_line_retrieval():
    torch.manual_seed(0)
    tokenizer = WordTokenizer()
    config = ModelConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, bos_token_id=0,
                         eos_token_id=None)
    model = Llama(config)
    eval_seeds = range(10 ** 7, 10 ** 7 + 20)          # never trained on
    before, _ = accuracy(model, tokenizer, eval_seeds)
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(200):
        ids, labels = training_batch(tokenizer, step * 24, 24)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, by_depth = accuracy(model, tokenizer, eval_seeds)
    chance = 1 / LINES    # copying the value of a random line
    assert before < 2 * chance, f"the untrained model already scores {before}"
    # 120 answers: a random line's value would reach 0.6 with probability < 1e-20
    assert after >= 0.6, f"accuracy {after} after training (chance {chance:.2f}), by depth {by_depth}"
    assert all(row["accuracy"] >= 0.3 for row in by_depth), by_depth
