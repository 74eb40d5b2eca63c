"""Loss by token position: does the loss keep falling past the context the model was trained on?

Each held-out sequence is run once (sequence-parallel when the model is);
the loss of every token, as a function of how many tokens precede it, is summed into position
buckets (log-spaced by default: 1, 2, 4, ... tokens of context) and averaged over the sequences.

Held-out long sequences: a data set of long documents is best; from ShareGPT (whose conversations
are short) `packed_sequences` concatenates rendered conversations into streams of the asked length,
so later positions see earlier, unrelated conversations: a flat curve there is the honest answer.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from longctx.model.llama import Llama

from .decode import shard_prompt

IGNORE_INDEX = -100


@torch.no_grad()
def token_losses(model: Llama, input_ids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Cross entropy [B, S - 1] (fp32) of token t + 1 given tokens 0..t, for input_ids [B, S].

    The seq x vocab logits exist `chunk_size` tokens at a time. Under sequence parallelism every
    rank of the group passes the same input_ids and gets the whole result.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, seqlen >= 2), got shape {tuple(input_ids.shape)}")
    labels = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)          # shifted on the whole sequence
    shard, extra = shard_prompt(model, input_ids, {"labels": labels})
    hidden = model.hidden_states(shard.input_ids, shard.position_ids, shard.cu_seqlens)
    weight = model.lm_head.weight
    losses = []
    for piece, target in zip(hidden.split(chunk_size, dim=1), extra["labels"].split(chunk_size, dim=1)):
        logits = (piece @ weight.T).float()
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="none").view(target.shape))
    local = torch.cat(losses, dim=1)
    whole = local if shard.dims is None else shard.dims.gather(local, dim=1)
    return whole[:, :shard.length - 1]


def bucket_edges(max_length: int, buckets: int | None = None, scale: str = "log") -> list[int]:
    """Edges of position buckets covering context sizes 1 .. max_length - 1.

    "log": 1, 2, 4, ... (powers of two, then max_length); "linear": `buckets` equal widths."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if scale == "log":
        edges = [1 << k for k in range(int(math.log2(max_length - 1)) + 1)]
    elif scale == "linear":
        count = buckets or 16
        edges = sorted({1 + round(i * (max_length - 1) / count) for i in range(count)})
    else:
        raise ValueError(f"unknown bucket scale {scale!r}; use 'log' or 'linear'")
    return edges + [max_length] if edges[-1] < max_length else edges


def loss_by_position(model: Llama, sequences: list[torch.Tensor], edges: list[int],
                     chunk_size: int = 4096) -> list[dict]:
    """Mean loss per position bucket over `sequences` (1-D token ids, each run alone).

    The token at index p has p tokens of context; bucket i holds edges[i] <= p < edges[i + 1].
    Returns [{"start", "end", "tokens", "loss", "ppl"}, ...] for buckets that got tokens.
    """
    edges_t = torch.tensor(edges)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    device = next(model.parameters()).device
    for sequence in sequences:
        losses = token_losses(model, sequence.view(1, -1).to(device), chunk_size)[0].double().cpu()
        context = torch.arange(1, sequence.numel())
        bucket = torch.searchsorted(edges_t, context, right=True) - 1
        inside = (bucket >= 0) & (bucket < len(edges) - 1)
        sums.index_add_(0, bucket[inside], losses[inside])
        counts.index_add_(0, bucket[inside], torch.ones_like(bucket[inside]))
    rows = []
    for i in range(len(edges) - 1):
        if counts[i]:
            loss = float(sums[i] / counts[i])
            rows.append({"start": edges[i], "end": edges[i + 1], "tokens": int(counts[i]), "loss": loss,
                         "ppl": math.exp(min(loss, 50.0))})
    return rows


def conversation_sequences(conversations: list, tokenizer, length: int, count: int, seed: int = 0,
                           chat_template: str = "llama3") -> list[torch.Tensor]:
    """`packed_sequences` of ShareGPT conversations rendered with the chat template; only as many
    conversations (in a seeded order) are tokenized as the sequences need."""
    from longctx.data import tokenize_conversations
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    tokens, total, batch = [], 0, 64
    for first in range(0, len(order), batch):
        chosen = [conversations[i] for i in order[first:first + batch]]
        ids = tokenize_conversations(chosen, tokenizer, chat_template=chat_template, loss_mask="all")["input_ids"]
        tokens += ids
        total += sum(len(x) for x in ids)
        if total >= length * count:
            break
    return packed_sequences(tokens, length, count, seed=None)


def packed_sequences(token_lists: list, length: int, count: int, seed: int | None = 0) -> list[torch.Tensor]:
    """Up to `count` sequences of exactly `length` tokens: documents in a seeded order (seed None:
    as given), joined end to end (a document may continue into the next sequence). Fewer when the
    tokens run out."""
    order = list(range(len(token_lists)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    stream, need = [], length * count
    total = 0
    for i in order:
        stream.append(np.asarray(token_lists[i], dtype=np.int64))
        total += len(stream[-1])
        if total >= need:
            break
    flat = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int64)
    usable = len(flat) // length
    if usable == 0:
        raise ValueError(f"the held-out documents hold {len(flat)} tokens, fewer than one sequence of "
                         f"{length}: give more documents or a shorter length")
    return [torch.from_numpy(flat[i * length:(i + 1) * length]) for i in range(min(count, usable))]
