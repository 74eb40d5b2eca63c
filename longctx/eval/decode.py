"""Greedy decoding of short answers after a long prompt: prefill once, then one token at a time.

Prefill runs the model's own forward over the prompt (with whatever mixers the model runs: `sdpa`,
`flash`, or a sequence-parallel method's across a group) while every layer's `project` is wrapped to
keep the keys and values it hands its mixer (rotated: the rotation works in place, so the
projections' raw outputs are not the keys): the KV cache. Each decoded token then costs
one small step against the cache instead of a forward over the whole context.

Linear-attention layers keep their recurrent state instead (S = sum_t exp(-decay (T-1-t)) k_t^T v_t,
fp32), worked out from the same kept keys and values; a decode step updates it in place.

Sequence parallel (a model given to `longctx.parallel.parallelize.apply_sequence_parallel`, which
leaves its `ParallelDims` on it as `model.sequence_dims`): the prompt is split as the method's record
says (zigzag for ring, contiguous for LASP and Ulysses, ...). Each rank caches the keys/values of its
own share and nobody holds the whole cache (a linear layer's state is summed over the ranks once,
then kept by all). A decode step computes the new token's query on every rank (the layers
are replicated), attends it to the local cache, and merges the ranks' partial outputs by their
log-sum-exp with three all-reduces per layer (the same merge ring attention uses). The keys and
values of decoded tokens are kept by group rank 0 only, so they count once.

A prompt whose length does not divide by the layout's divisor is padded at the end with a
separate document (its own `cu_seqlens` entry) that the prompt never sees, and dropped from the cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.model.llama import Attention, Llama
from longctx.ops.attention.backends import merge_into
from longctx.ops.attention.naive import accumulation_dtype


def group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_dims(model: Llama):
    """The model's sequence-parallel dims (`model.sequence_dims`), or None: one process."""
    dims = getattr(model, "sequence_dims", None)
    return dims if dims is not None and dims.method is not None else None


def sequence_group(model: Llama) -> tuple[object, int, int]:
    """(group, rank, ranks) that share one sequence: the sp group under sequence parallelism;
    otherwise each process works alone (rank 0 of 1), whatever else runs beside it."""
    dims = sequence_dims(model)
    if dims is None:
        return None, 0, 1
    return (dims.sp_group, *group_info(dims.sp_group))


@dataclass
class Shard:
    """This rank's share of one prompt (batch 1 per row, all rows the same length)."""
    input_ids: torch.Tensor        # [B, S_local]
    position_ids: torch.Tensor     # [B, S_local]
    index: torch.Tensor            # [S_local] positions of these tokens in the padded sequence
    cu_seqlens: torch.Tensor | None
    length: int                    # real tokens (without the padding)
    dims: object = None            # the model's ParallelDims; None: not split

    @property
    def real(self) -> torch.Tensor:
        return self.index < self.length


def shard_prompt(model: Llama, input_ids: torch.Tensor, extra: dict | None = None) -> tuple[Shard, dict]:
    """Split `input_ids` [B, S] (and any [B, S] tensors in `extra`, padded with -100) for the
    model's mixers: whole on one process, as its sequence-parallel method splits otherwise."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    extra = extra or {}
    dims = sequence_dims(model)
    length = input_ids.shape[1]
    device = input_ids.device
    positions = torch.arange(length, device=device)
    if dims is None:
        shard = Shard(input_ids, positions.expand_as(input_ids), positions, None, length)
        return shard, extra
    divisor = dims.seq_divisor
    padded = -(-length // divisor) * divisor
    pad = padded - length
    cu_seqlens = None
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
        positions = torch.cat([positions, torch.arange(pad, device=device)])
        extra = {k: torch.nn.functional.pad(v, (0, pad), value=-100) for k, v in extra.items()}
        # the padding is a document of its own: the prompt never attends to it
        cu_seqlens = torch.tensor([0, length, padded], dtype=torch.int32, device=device)
        if input_ids.shape[0] > 1:
            raise ValueError("sequence-parallel prefill of a batch needs prompts whose length divides "
                             f"by {divisor}; evaluate one prompt at a time")
    index = torch.arange(padded, device=device)
    split = lambda x: dims.split(x, dim=1)  # noqa: E731
    shard = Shard(split(input_ids), split(positions.expand_as(input_ids)), split(index[None])[0],
                  cu_seqlens, length, dims)
    return shard, {k: split(v) for k, v in extra.items()}


class KVCache:
    """Per layer: keys (rotated) and values [B, S, Hkv, D] of the prompt tokens this rank holds,
    and apart from them those of the decoded tokens (so a step never copies the long part)."""

    def __init__(self, keys: list, values: list, length: int, states: list | None = None):
        self.keys, self.values = keys, values             # None for a linear layer
        self.new_keys = [None if k is None else k[:, :0] for k in keys]
        self.new_values = [None if v is None else v[:, :0] for v in values]
        self.states = states or [None] * len(keys)        # linear layers: [B, H, Dk, Dv], fp32
        self.length = length     # tokens in the whole sequence so far: the next token's position

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.new_keys[layer] = torch.cat([self.new_keys[layer], k], dim=1)
        self.new_values[layer] = torch.cat([self.new_values[layer], v], dim=1)

    def blocks(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.keys[layer], self.values[layer]), (self.new_keys[layer], self.new_values[layer])]


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, H, D]: query head h reads kv head h // (H // Hkv)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def linear_state(attn, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, length: int,
                 group, world: int) -> torch.Tensor:
    """The recurrent state [B, H, Dk, Dv] after `length` tokens, from the (silu'd) keys and values
    [B, S, Hkv, D] at global `positions` [S] that this rank holds, summed over the group."""
    accum = accumulation_dtype(k.dtype)
    k, v = _expand_heads(k, attn.num_heads).to(accum), _expand_heads(v, attn.num_heads).to(accum)
    age = (length - 1 - positions).to(accum)                             # tokens after each one
    weight = torch.exp(-attn.decay.to(accum)[None, :] * age[:, None])    # [S, H]
    state = torch.einsum("bshd,sh,bshe->bhde", k, weight, v)
    if world > 1:
        dist.all_reduce(state, group=group)
    return state


def _owner_broadcast(x: torch.Tensor, owner: int, group, world: int) -> torch.Tensor:
    """`x` as held by group rank `owner`, on every rank of the group."""
    if world == 1:
        return x
    whole = group if group is not None else dist.group.WORLD
    dist.broadcast(x, src=dist.get_global_rank(whole, owner), group=group)
    return x


@torch.no_grad()
def prefill(model: Llama, input_ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """The logits [B, V] after the last prompt token, and the cache of this rank's share."""
    shard, _ = shard_prompt(model, input_ids)
    group, _, world = sequence_group(model)
    layers = [layer.self_attn for layer in model.layers]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, attn in enumerate(layers):
        attn.project = _keeping_keys(attn.project, captured, i)   # an instance attribute over the method
    try:
        hidden = model.hidden_states(shard.input_ids, shard.position_ids, shard.cu_seqlens)  # [B, S_local, h]
    finally:
        for attn in layers:
            del attn.project
    real = shard.real
    keys, values, states = [], [], []
    for i, attn in enumerate(layers):
        k, v = captured.pop(i)                       # [B, S_local, Hkv, D]: rotated, or silu'd for linear layers
        if isinstance(attn, Attention):
            keys.append(k[:, real].contiguous())
            values.append(v[:, real].contiguous())
            states.append(None)
        else:
            keys.append(None)
            values.append(None)
            states.append(linear_state(attn, k[:, real], v[:, real], shard.index[real], shard.length, group, world))
    last = shard.length - 1
    holder = (shard.index == last).nonzero()
    final = hidden[:, holder[0, 0]] if holder.numel() else torch.zeros_like(hidden[:, 0])
    final = _owner_broadcast(final.contiguous(), _rank_holding(last, shard, group, world), group, world)
    return model.lm_head(final).float(), KVCache(keys, values, shard.length, states)


@torch.no_grad()
def prefill_packed(model: Llama, prompts: list[list[int]]) -> tuple[torch.Tensor, list[KVCache]]:
    """Several prompts in one forward, packed in one row as separate documents (`cu_seqlens`: none
    sees another, each starts at position 0): the logits [N, V] after each prompt's last token and
    one cache per prompt. Short prompts fill the GPU together instead of one small forward each.
    One process only (a sequence-parallel model prefills prompt by prompt)."""
    if sequence_dims(model) is not None:
        raise ValueError("packed prefill runs on one process; prefill prompt by prompt under sequence parallelism")
    if not all(isinstance(layer.self_attn, Attention) for layer in model.layers):
        raise ValueError("packed prefill caches softmax layers only; prefill a model with linear layers prompt by prompt")
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError("packed prefill needs at least one prompt, none empty")
    ids = torch.tensor([[t for p in prompts for t in p]], device=device)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    layers = [layer.self_attn for layer in model.layers]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, attn in enumerate(layers):
        attn.project = _keeping_keys(attn.project, captured, i)
    try:
        hidden = model.hidden_states(ids, None, cu_seqlens)                 # [1, total, h]
    finally:
        for attn in layers:
            del attn.project
    kv = [captured.pop(i) for i in range(len(layers))]
    caches = [KVCache([k[:, a:b].contiguous() for k, _ in kv], [v[:, a:b].contiguous() for _, v in kv], b - a)
              for a, b in zip(bounds, bounds[1:])]
    last = torch.tensor(bounds[1:], device=device) - 1
    return model.lm_head(hidden[0, last]).float(), caches


@torch.no_grad()
def greedy_generate_packed(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_token_id=None,
                           batch_tokens: int = 65536) -> list[list[int]]:
    """Greedy continuations of `prompts` (lists of token ids): prompts packed `batch_tokens` at a
    time (a longer prompt alone) into one prefill, then each decoded against its own cache.
    Stops a prompt at its first end token (kept in the output) or after `max_new_tokens`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ends = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in prompts]
    packs, current, size = [], [], 0
    for i, prompt in enumerate(prompts):
        if current and size + len(prompt) > batch_tokens:
            packs.append(current)
            current, size = [], 0
        current.append(i)
        size += len(prompt)
    if current:
        packs.append(current)
    for pack in packs:
        logits, caches = prefill_packed(model, [prompts[i] for i in pack])
        first = logits.argmax(-1).tolist()
        for row, (i, cache) in enumerate(zip(pack, caches)):
            token = first[row]
            outputs[i].append(token)
            while token not in ends and len(outputs[i]) < max_new_tokens:
                token = int(decode_step(model, torch.tensor([[token]], device=device), cache).argmax(-1))
                outputs[i].append(token)
        del caches
    return outputs


def _keeping_keys(project, captured: dict, index: int):
    """`project` that also puts the keys and values it returns into captured[index]."""
    def run(*args, **kwargs):
        q, k, v = project(*args, **kwargs)
        captured[index] = (k, v)
        return q, k, v
    return run


def _rank_holding(index: int, shard: Shard, group, world: int) -> int:
    """The group rank whose share holds position `index` of the padded sequence (every rank
    says whether it holds it: no layout arithmetic)."""
    if world == 1:
        return 0
    holder = torch.tensor([group_info(group)[0] if bool((shard.index == index).any()) else -1],
                          device=shard.index.device)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX, group=group)
    return int(holder)


def attend_cached(q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]], scale: float, group=None,
                  world: int = 1) -> torch.Tensor:
    """Attention of new queries q [B, 1, H, D] to all cached keys/values of the group: this rank's
    `blocks` of (keys, values) [B, S_i, Hkv, D] (S_i may be 0) merged by log-sum-exp, then the
    ranks' results merged the same way. Returns [B, 1, H, D]."""
    batch, _, heads, dim = q.shape
    kv_heads = blocks[0][0].shape[2]
    queries = q.reshape(batch, kv_heads, heads // kv_heads, dim)          # head h reads kv head h // G
    accum = accumulation_dtype(q.dtype)                                         # merged in fp32 at least
    lse = torch.full(queries.shape[:3], -math.inf, device=q.device, dtype=accum)   # [B, Hkv, G]
    out = torch.zeros(queries.shape, device=q.device, dtype=accum)                 # [B, Hkv, G, D]
    for keys, values in blocks:
        if not keys.shape[1]:
            continue
        scores = torch.einsum("bkgd,bskd->bkgs", queries.to(keys.dtype), keys).to(accum) * scale
        block_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - block_lse[..., None])
        block_out = torch.einsum("bkgs,bskd->bkgd", probs.to(values.dtype), values).to(accum)
        # the seam's one merge, on views in its layout: out (B, 1, Hkv*G, D) with lse (B, Hkv*G, 1)
        merge_into(out.view(batch, 1, heads, dim), lse.view(batch, heads, 1),
                   block_out.reshape(batch, 1, heads, dim), block_lse.reshape(batch, heads, 1))
    if world > 1:
        top = lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        weight = torch.exp(lse - top)                                      # 0 where a rank holds nothing
        out = out * weight[..., None]
        dist.all_reduce(out, group=group)
        dist.all_reduce(weight, group=group)
        out = out / weight[..., None]
    return out.reshape(batch, 1, heads, dim).to(q.dtype)


def linear_step(attn, h: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
    """One token [B, 1, hidden] through a linear-attention layer: S = exp(-decay) S + k^T v, o = q S
    (the state is the same on every rank: no communication)."""
    batch = h.shape[0]
    q, k, v = attn.project(h)
    q, k, v = q[:, 0], _expand_heads(k, attn.num_heads)[:, 0], _expand_heads(v, attn.num_heads)[:, 0]
    state = cache.states[layer]
    state = torch.exp(-attn.decay.to(state.dtype))[None, :, None, None] * state
    state = state + torch.einsum("bhd,bhe->bhde", k.to(state.dtype), v.to(state.dtype))
    cache.states[layer] = state
    out = torch.einsum("bhd,bhde->bhe", q.to(state.dtype), state).to(h.dtype).reshape(batch, 1, -1)
    return attn.output(out, h)


@torch.no_grad()
def decode_step(model: Llama, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row [B, 1] at position `cache.length`; returns the next logits [B, V]."""
    group, rank, world = sequence_group(model)
    keeper = rank == 0                      # decoded tokens' keys live on group rank 0 only
    x = model.embed_tokens(tokens)
    positions = torch.full_like(tokens, cache.length)
    cos, sin = model.rotary(positions, x.dtype)
    batch = tokens.shape[0]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if isinstance(attn, Attention):
            q, k, v = attn.project(h, cos, sin)
            if keeper:
                cache.append(i, k, v)
            out = attend_cached(q, cache.blocks(i), q.shape[-1] ** -0.5, group, world)
            x = x + attn.output(out.reshape(batch, 1, -1), h)
        else:
            x = x + linear_step(attn, h, cache, i)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length += 1
    return model.lm_head(model.norm(x))[:, -1].float()


@torch.no_grad()
def greedy_generate(model: Llama, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
                    use_cache: bool = True) -> torch.Tensor:
    """The greedily decoded continuation [B, <= max_new_tokens] of `input_ids` [B, S].

    Stops early when every row has produced an end token (`eos_token_id`: an id or a list; rows
    that ended keep decoding, as transformers pads them, and callers cut at the first end token).
    Under sequence parallelism every rank of the group calls this with the same prompt and gets
    the same tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ends = torch.tensor([] if eos_token_id is None else
                        ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                        device=input_ids.device, dtype=torch.long)
    group, _, world = sequence_group(model)
    if use_cache:
        logits, cache = prefill(model, input_ids)
    else:
        if world > 1:
            raise ValueError("use_cache=False decodes on one process only: evaluate a model without "
                             "sequence parallelism (no apply_sequence_parallel)")
        sequence = input_ids
        logits = model(sequence).logits[:, -1].float()
    new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        # ranks agree on the logits up to rounding: rank 0's choice is everyone's
        token = _owner_broadcast(logits.argmax(-1).contiguous(), 0, group, world)
        new.append(token)
        done |= torch.isin(token, ends)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode_step(model, token[:, None], cache)
        else:
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            logits = model(sequence).logits[:, -1].float()
    return torch.stack(new, dim=1)
