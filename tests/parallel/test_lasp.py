"""LASP on 2 and 4 gloo processes equals one process: outputs and the gradients of q, k, v for both
variants, with packed documents that cross shard boundaries, and a whole hybrid-model training step.

Tolerances: the single-process kernel's error against the float64 recurrence sets the scale; LASP
may differ from the truth by at most twice that plus a few fp32 roundings of the values' size.

The LASP tests run the Triton kernel (under the interpreter); the model step runs the kernel's
PyTorch path, which is faster on a CPU and computes the same.
"""
import pytest
import torch

from distributed import run_distributed

import longctx.parallel.lasp as lasp
from longctx.model import Llama, ModelConfig
from longctx.model.llama import positions_from_cu_seqlens, shift_labels
from longctx.ops.cross_entropy import IGNORE_INDEX
from longctx.ops.linear import lightning_attn_func
from longctx.ops.linear.naive import lightning_attn_recurrent
from longctx.parallel.allgather_kv import allgather_kv_attention
from longctx.parallel.sequence import split_sequence

EPS32 = torch.finfo(torch.float32).eps
SHARD = 24
# Global document starts for 96 tokens. On 4 ranks (shards of 24): rank 1 starts a document inside,
# rank 2 starts none (the state passes through), rank 3 starts one exactly at its first token and one
# inside.
CU_SEQLENS = [0, 10, 30, 72, 90, 96]
# For 48 tokens on 2 ranks: [10, 30) crosses the boundary at 24; rank 1 starts two documents.
CU_SEQLENS_2 = [0, 10, 30, 40, 48]


def _case(seed, world, packed):
    """Full-sequence inputs: batch 1 packed with documents, or batch 2 of whole sequences; GQA."""
    g = torch.Generator().manual_seed(seed)
    batch = 1 if packed else 2
    total = world * SHARD
    heads, kv_heads, dk, dv = 2, 1, 8, 6
    q = torch.randn(batch, total, heads, dk, generator=g)
    k = torch.randn(batch, total, kv_heads, dk, generator=g)
    v = torch.randn(batch, total, kv_heads, dv, generator=g)
    dout = torch.randn(batch, total, heads, dv, generator=g)
    decay = torch.tensor([0.0, 0.3])  # zero decay too: the state never fades
    cu = torch.tensor(CU_SEQLENS if world == 4 else CU_SEQLENS_2, dtype=torch.int32) if packed else None
    return q, k, v, dout, decay, cu


def _softmax_case(seed, world, packed):
    """As `_case`, with v and dO of the query head dim (softmax attention needs one head dim)."""
    q, k, _, _, decay, cu = _case(seed, world, packed)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(k.shape, generator=g)
    return q, k, v, torch.randn(q.shape, generator=g), decay, cu


def _cases(world):
    return (True, False) if world == 2 else (True,)


def _lasp_worker(rank, world, seed):
    lasp._CORRECTION_CHUNK = 5  # exercise the sliced corrections
    results = {}
    for packed in _cases(world):
        q, k, v, dout, decay, cu = _case(seed, world, packed)
        for variant in lasp.VARIANTS:
            local = [split_sequence(x, None, dim=1, layout="contiguous").requires_grad_(True) for x in (q, k, v)]
            out = lasp.lasp_attn_func(*local, decay, None, cu_seqlens=cu, variant=variant, kernel=True)
            out.backward(split_sequence(dout, None, dim=1, layout="contiguous"))
            results[packed, variant] = [out.detach()] + [x.grad for x in local]
    if world == 2:  # the softmax layers of hybrid models on the same contiguous shards
        for packed in (True, False):
            # the Triton kernels (interpreted) in fp32, and the torch backend in float64
            for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
                q, k, v, dout, _, cu = _softmax_case(seed, world, packed)
                local = [split_sequence(x.to(dtype), None, dim=1, layout="contiguous").requires_grad_(True)
                         for x in (q, k, v)]
                out = allgather_kv_attention(*local, cu_seqlens=cu, backend=backend)
                out.backward(split_sequence(dout.to(dtype), None, dim=1, layout="contiguous"))
                results[packed, "allgather_kv", backend] = [out.detach()] + [x.grad for x in local]
    if world == 4:  # a 2-D mesh: two sequence groups {0, 1} and {2, 3} side by side, on different data
        import torch.distributed as dist
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group = groups[rank // 2]
        q, k, v, dout, decay, cu = _case(seed + rank // 2, 2, True)
        for variant in lasp.VARIANTS:
            local = [split_sequence(x, group, dim=1, layout="contiguous").requires_grad_(True) for x in (q, k, v)]
            out = lasp.lasp_attn_func(*local, decay, group, cu_seqlens=cu, variant=variant, kernel=True)
            out.backward(split_sequence(dout, group, dim=1, layout="contiguous"))
            results["subgroup", variant] = [out.detach()] + [x.grad for x in local]
    return results


def _reference(q, k, v, dout, decay, cu):
    """(single-process kernel in fp32, truth in float64), each [out, dq, dk, dv]."""
    found = []
    for dtype, fn in ((torch.float32, lambda *a: lightning_attn_func(*a, kernel=True)[0]),
                      (torch.float64, lambda *a: lightning_attn_recurrent(*a)[0])):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out = fn(*leaves, decay, None, cu)
        out.backward(dout.to(dtype))
        found.append([out.detach()] + [x.grad for x in leaves])
    return found


def _softmax_reference(q, k, v, dout, decay, cu):
    """Causal softmax attention of the whole sequence (sdpa): (fp32, float64), each [out, dq, dk, dv]."""
    from longctx.model.attention import sdpa_attention
    found = []
    for dtype in (torch.float32, torch.float64):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out = sdpa_attention(*leaves, cu_seqlens=cu)
        out.backward(dout.to(dtype))
        found.append([out.detach()] + [x.grad for x in leaves])
    return found


def _assert_close(got, single, truth, name):
    got, single, truth = got.double(), single.double(), truth.double()
    reference_error = (single - truth).abs().max().item()
    tolerance = 2 * reference_error + 8 * EPS32 * truth.abs().max().item()
    error = (got - truth).abs().max().item()
    assert error <= tolerance, f"{name}: error {error:.3e} > tolerance {tolerance:.3e}"


@pytest.mark.parametrize("world", [2, 4], ids=["2ranks", "4ranks"])
def test_lasp_matches_one_process(world):
    """On 4 ranks also two sequence groups of 2 side by side (the sequence axis of a 2-D mesh)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    results = run_distributed(_lasp_worker, world, seed)
    for packed in _cases(world):
        single, truth = _reference(*_case(seed, world, packed))
        for variant in lasp.VARIANTS:
            for i, name in enumerate(("out", "dq", "dk", "dv")):
                got = torch.cat([results[r][packed, variant][i] for r in range(world)], dim=1)
                _assert_close(got, single[i], truth[i], f"{variant} packed={packed} {name} (seed {seed})")
    if world == 2:
        for packed in (True, False):
            single, truth = _softmax_reference(*_softmax_case(seed, world, packed))
            for i, name in enumerate(("out", "dq", "dk", "dv")):
                got = torch.cat([results[r][packed, "allgather_kv", "triton"][i] for r in range(world)], dim=1)
                _assert_close(got, single[i], truth[i], f"allgather_kv packed={packed} {name} (seed {seed})")
                got = torch.cat([results[r][packed, "allgather_kv", "torch"][i] for r in range(world)], dim=1)
                error = ((got - truth[i]).norm() / truth[i].norm()).item()
                assert got.dtype == torch.float64 and error < 1e-10, (
                    f"allgather_kv on torch, float64, packed={packed} {name}: relative error {error:.2e}")
    if world == 4:
        for index, ranks in enumerate(([0, 1], [2, 3])):
            single, truth = _reference(*_case(seed + index, 2, True))
            for variant in lasp.VARIANTS:
                for i, name in enumerate(("out", "dq", "dk", "dv")):
                    got = torch.cat([results[r]["subgroup", variant][i] for r in ranks], dim=1)
                    _assert_close(got, single[i], truth[i], f"{variant} sequence group {ranks} {name} (seed {seed})")


def test_shard_documents():
    docs = [lasp.shard_documents(torch.tensor(CU_SEQLENS, dtype=torch.int32), r, 4, SHARD) for r in range(4)]
    assert [d.passes for d in docs] == [(False, False, True, False)] * 4
    assert [d.carry_end for d in docs] == [0, 6, 24, 0]
    assert [d.last_start for d in docs] == [10, 6, 0, 18]
    assert [d.kernel_bounds for d in docs] == [(0, 10, 24), (0, 6, 24), None, (0, 18, 24)]


def test_bad_input_is_named():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="variant"):
        lasp.lasp_attn_func(q, q, q, torch.zeros(2), variant="zigzag")
    with pytest.raises(ValueError, match="fixed"):
        lasp.lasp_attn_func(q, q, q, torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="one value per query head"):
        lasp.lasp_attn_func(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="batch size 1"):
        lasp.lasp_attn_func(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                            torch.zeros(2), cu_seqlens=torch.tensor([0, 3, 16], dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# A whole hybrid-model training step

HYBRID_TOKENS = 64
HYBRID_CU = [0, 13, 40, 64]  # documents cross the shard boundary at 32 (2 ranks)


def _hybrid_config(attention, linear_attention):
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, layer_types=["linear", "softmax", "linear"],
                       attention=attention, linear_attention=linear_attention, loss_chunk_size=16)


def _hybrid_batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, HYBRID_TOKENS), generator=g)
    labels = ids.clone()
    labels[0, torch.randint(0, HYBRID_TOKENS, (8,), generator=g)] = IGNORE_INDEX
    cu = torch.tensor(HYBRID_CU, dtype=torch.int32)
    return ids, shift_labels(labels), cu, positions_from_cu_seqlens(cu, ids.shape)


def _model_step(model, ids, labels, cu, positions, count):
    loss = model(ids, position_ids=positions, cu_seqlens=cu, labels=labels, labels_shifted=True,
                 loss_reduction="sum").loss / count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _hybrid_worker(rank, world, seed):
    import torch.distributed as dist
    ids, labels, cu, positions = _hybrid_batch(seed)
    count = (labels != IGNORE_INDEX).sum()
    local = [split_sequence(x, None, dim=1, layout="contiguous") for x in (ids, labels, positions)]
    results = {}
    for linear_attention in ("lasp", "lasp_allgather"):
        torch.manual_seed(seed)
        model = Llama(_hybrid_config("allgather_kv", linear_attention))
        loss, grads = _model_step(model, local[0], local[1], cu, local[2], count)
        dist.all_reduce(loss)
        for g in grads.values():  # parameters are replicated over the sequence group: sum the shares
            dist.all_reduce(g)
        results[linear_attention] = loss, grads
    return results


def test_hybrid_training_step_matches_one_process(monkeypatch):
    """LASP (both variants) for the linear layers, all-gather-KV attention for the softmax layer."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    results = run_distributed(_hybrid_worker, 2, seed)
    ids, labels, cu, positions = _hybrid_batch(seed)
    count = (labels != IGNORE_INDEX).sum()
    found = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(seed)
        model = Llama(_hybrid_config("sdpa", "lightning")).to(dtype)
        found.append(_model_step(model, ids, labels, cu, positions, count))
    (loss32, grads32), (loss64, grads64) = found
    for rank, (variant, (loss, grads)) in ((r, item) for r in range(2) for item in results[r].items()):
        _assert_close(loss, loss32, loss64, f"rank {rank} {variant} loss")
        assert grads.keys() == grads64.keys()
        for name in grads64:
            _assert_close(grads[name], grads32[name], grads64[name], f"rank {rank} {variant} grad {name} (seed {seed})")
