"""Ulysses (and USP) attention on 2 and 4 gloo processes against one process.

Each case draws fresh random inputs of the whole sequence in the parent; the ranks take their
shares, run forward and backward on the attention backend the case names (`auto`: the torch backend
on a CPU; `triton`: the kernel, interpreted), and return their local output and q, k, v gradients.
Float64 cases must equal the shares of the float64 truth to float64 round-off; fp32 cases within
twice the error of the same backend on one process plus a few fp32 roundings: Ulysses runs that
same attention on the same numbers, only for fewer heads per process. One spawned pool runs every
case of a process count.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run on the CPU

import pytest
import torch

from distributed import run_distributed
from longctx.model.attention import softmax_attention
from longctx.ops.linear import lightning_attn_func
from longctx.ops.linear.naive import lightning_attn_recurrent
from longctx.parallel.sequence import gather_sequence_usp, split_sequence, split_sequence_usp
from longctx.parallel.ulysses import check_heads, ulysses_attn_func, ulysses_bytes_per_layer, ulysses_lightning_func
from longctx.parallel.ring import ring_bytes_per_layer
from longctx.parallel.usp import build_usp_groups, usp_attn_func, usp_bytes_per_layer, usp_group_ranks
from test_ring import FLOAT64_TOL, reference, rel_err, zigzag_share

EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------
# cases and references
# ------------------------------------------------------------------------------------------------
def softmax_case(batch, seqlen, heads, kv_heads, causal=True, cu_seqlens=None, packed=False, head_dim=16,
                 dtype=torch.float32, backend="auto"):
    """Whole-sequence inputs. `cu_seqlens`: document starts of the flattened (B x S) sequence
    plus its total; `packed`: the ranks get (T/U, H, D) shares instead of (B, S/U, H, D)."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ()).item()))
    shapes = dict(q=heads, k=kv_heads, v=kv_heads, dout=heads)
    case = {n: torch.randn(batch, seqlen, h, head_dim, generator=gen, dtype=torch.float64).to(dtype)
            for n, h in shapes.items()}
    cu = torch.tensor(cu_seqlens, dtype=torch.int32) if cu_seqlens is not None else None
    return dict(case, causal=causal, cu_seqlens=cu, packed=packed, backend=backend)


def single_reference(case):
    """Output and gradients of the case's backend on one process over the whole sequence."""
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = softmax_attention(q, k, v, backend=case["backend"], causal=case["causal"], cu_seqlens=case["cu_seqlens"])
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), case["dout"])]


def lightning_case(seqlen, heads, kv_heads, cu_seqlens=None):
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ()).item()))
    dk, dv = 8, 12  # different key and value head dims
    shapes = dict(q=(heads, dk), k=(kv_heads, dk), v=(kv_heads, dv), dout=(heads, dv))
    case = {n: torch.randn(1, seqlen, h, d, generator=gen) for n, (h, d) in shapes.items()}
    case["q"], case["k"] = case["q"] * dk ** -0.5, case["k"] * dk ** -0.5  # keep the sums of a few tokens O(1)
    case["decay"] = torch.rand(heads, generator=gen) * 0.5
    case["decay"][0] = 0.0  # a head whose state never fades
    case["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32) if cu_seqlens is not None else None
    return case


def lightning_reference(case):
    """(single-process fp32 lightning, float64 recurrence), each [out, dq, dk, dv]."""
    found = []
    for dtype, fn in ((torch.float32, lightning_attn_func), (torch.float64, lightning_attn_recurrent)):
        leaves = [case[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
        out = fn(*leaves, case["decay"], None, case["cu_seqlens"])[0]
        found.append([out.detach(), *torch.autograd.grad(out, leaves, case["dout"].to(dtype))])
    return found


# ------------------------------------------------------------------------------------------------
# what each rank runs
# ------------------------------------------------------------------------------------------------
def _ulysses_case(case, group):
    names = ("q", "k", "v", "dout")
    local = {n: split_sequence(case[n], group, dim=1, layout="contiguous") for n in names}
    if case.get("packed"):
        local = {n: x[0] for n, x in local.items()}  # (T/U, H, D)
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    if "decay" in case:
        out = ulysses_lightning_func(q, k, v, case["decay"], group, cu_seqlens=case["cu_seqlens"])
    else:
        out = ulysses_attn_func(q, k, v, group, causal=case["causal"], cu_seqlens=case["cu_seqlens"],
                                backend=case["backend"])
    out.backward(local["dout"])
    return [out.detach(), q.grad, k.grad, v.grad]


def _usp_case(case, ulysses_group, ring_group):
    local = {n: split_sequence_usp(case[n], ulysses_group, ring_group) for n in ("q", "k", "v", "dout")}
    if case.get("packed"):
        local = {n: x[0] for n, x in local.items()}
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    out = usp_attn_func(q, k, v, ulysses_group, ring_group, causal=case["causal"], cu_seqlens=case["cu_seqlens"],
                        backend=case["backend"])
    out.backward(local["dout"])
    return [out.detach(), q.grad, k.grad, v.grad]


def _error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as error:
        return str(error)
    return None


def _worker(rank, world, ulysses_cases, usp_cases=None):
    results = {name: _ulysses_case(case, None) for name, case in ulysses_cases.items()}
    x = torch.randn(1, 4, 12, 16)
    # query heads the group size does not divide (3 on 2 ranks, 6 on 4); 12 query heads with KV heads
    # that neither divide the group size nor are divided by it (3 on 2 ranks, 6 on 4)
    odd = x[:, :, :3 * world // 2]
    results["error_heads"] = _error_of(lambda: ulysses_attn_func(odd, odd, odd))
    results["error_kv_heads"] = _error_of(lambda: ulysses_attn_func(x, odd, odd))
    local_documents = torch.tensor([0, 3, 4], dtype=torch.int32)  # of this rank's 4 tokens, not the whole
    results["error_cu_seqlens"] = _error_of(lambda: ulysses_attn_func(x[:, :, :4], x[:, :, :4], x[:, :, :4],
                                                                      cu_seqlens=local_documents))
    if usp_cases:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "sp"))
        ulysses_group, ring_group = build_usp_groups(USP_ULYSSES, mesh)
        for name, case in usp_cases.items():
            results[name] = _usp_case(case, ulysses_group, ring_group)
        x = torch.arange(2 * 16).view(2, 16)
        results["usp_split"] = split_sequence_usp(x, ulysses_group, ring_group)
        results["usp_round_trip"] = gather_sequence_usp(results["usp_split"], ulysses_group, ring_group)
        results["usp_error_length"] = _error_of(lambda: split_sequence_usp(x[:, :6], ulysses_group, ring_group))
        results["usp_error_ulysses"] = _error_of(lambda: build_usp_groups(3, mesh))
    return results


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def _local_share(x, rank, world, packed):
    share = x.chunk(world, dim=1)[rank]
    return share[0] if packed else share


def _assert_shares(name, results, world, truth, single, packed=False, share=_local_share):
    """Every rank's (out, dq, dk, dv) against its share of the truth, within twice the single
    process's error plus a few fp32 roundings of the values' size."""
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        t, s = truth[i].double(), single[i].double()
        if single[i].dtype == torch.float64:   # float64 round-off, relative to the values' size
            tolerance = FLOAT64_TOL * t.abs().max().item()
        else:
            tolerance = 2 * (s - t).abs().max().item() + 8 * EPS32 * t.abs().max().item()
        for rank in range(world):
            got = results[rank][name][i].double()
            error = (got - share(t, rank, world, packed)).abs().max().item()
            assert error <= tolerance, (f"{name}: rank {rank} {what} error {error:.2e} > tolerance "
                                        f"{tolerance:.2e} (single process {rel_err(s, t):.1e} relative)")


USP_ULYSSES = 2  # the 4-process USP cases: 2 (Ulysses) x 2 (ring)


def _usp_share(x, rank, world, packed):
    """Rank p's USP share: ring rank p div U's zigzag share, Ulysses rank p mod U's piece of it."""
    ring = world // USP_ULYSSES
    share = zigzag_share(x, rank // USP_ULYSSES, ring).chunk(USP_ULYSSES, dim=1)[rank % USP_ULYSSES]
    return share[0] if packed else share


def _check(results, cases, world, share=_local_share):
    for name, case in cases.items():
        if "decay" in case:
            single, truth = lightning_reference(case)
        else:
            single, truth = single_reference(case), reference(case)
        _assert_shares(name, results, world, truth, single, case.get("packed", False), share)
    for rank in range(world):
        heads, kv_heads = results[rank]["error_heads"], results[rank]["error_kv_heads"]
        assert heads is not None and "must divide the query heads" in heads and "\n" not in heads, heads
        assert kv_heads is not None and "key/value heads" in kv_heads and "\n" not in kv_heads, kv_heads
        documents = results[rank]["error_cu_seqlens"]
        assert documents is not None and f"sequence, {4 * world}" in documents, documents


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_ulysses_two_processes():
    cases = {
        "mha": softmax_case(2, 16, 4, 4),
        "gqa": softmax_case(1, 16, 4, 2, dtype=torch.float64),
        "mqa": softmax_case(1, 16, 4, 1),                 # one KV head replicated to both ranks
        "full": softmax_case(1, 12, 2, 2, causal=False, dtype=torch.float64),
        # packed (T/U, H, D) shares; [6, 17) crosses the shard boundary at 12; [5, 6) is one token
        "packed": softmax_case(1, 24, 2, 1, cu_seqlens=[0, 5, 6, 17, 24], packed=True, dtype=torch.float64),
        # the whole-sequence call through the Triton kernel (interpreted), as on a GPU
        "packed_triton": softmax_case(1, 24, 2, 1, cu_seqlens=[0, 5, 6, 17, 24], packed=True, backend="triton"),
        # batch rows with documents of the flattened (2 x 12) sequence, one crossing the row and shard
        "docs_batch": softmax_case(2, 12, 4, 2, cu_seqlens=[0, 3, 4, 10, 19, 24]),
        "lightning": lightning_case(32, 4, 2),
        "lightning_docs": lightning_case(32, 2, 1, cu_seqlens=[0, 9, 10, 25, 32]),
    }
    _check(run_distributed(_worker, 2, cases), cases, 2)


def test_ulysses_four_processes():
    cases = {
        "mha": softmax_case(1, 16, 4, 4),
        "gqa_replicated": softmax_case(1, 16, 8, 2, dtype=torch.float64),  # 2 KV heads, each on 2 of the 4 ranks
        "mqa": softmax_case(1, 16, 4, 1),
        "packed": softmax_case(1, 24, 4, 2, cu_seqlens=[0, 1, 7, 14, 23, 24], packed=True),
        "lightning_replicated": lightning_case(32, 4, 2, cu_seqlens=[0, 11, 12, 32]),
    }
    # 2 x 2: zigzag chunks of 8 tokens (ring rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2), each
    # share cut in two over the Ulysses pair
    usp_cases = {
        "usp_mha": softmax_case(1, 16, 4, 4),
        "usp_gqa": softmax_case(2, 16, 4, 2, dtype=torch.float64),
        "usp_mqa": softmax_case(1, 16, 4, 1),             # one KV head replicated over the Ulysses pair
        "usp_full": softmax_case(1, 16, 2, 2, causal=False),
        # [4, 13) and [13, 27) cross chunks and shards; [3, 4) is one token
        "usp_packed": softmax_case(1, 32, 4, 2, cu_seqlens=[0, 3, 4, 13, 27, 32], packed=True, dtype=torch.float64),
        "usp_docs_batch": softmax_case(2, 16, 2, 1, cu_seqlens=[0, 7, 8, 16, 21, 32]),
        # the ring's blocks through the Triton kernel's low level, as on a GPU
        "usp_triton": softmax_case(1, 32, 4, 2, cu_seqlens=[0, 5, 6, 20, 32], backend="triton"),
    }
    results = run_distributed(_worker, 4, cases, usp_cases)
    _check(results, cases, 4)
    _check(results, usp_cases, 4, share=_usp_share)
    whole = torch.arange(2 * 16).view(2, 16)
    for rank in range(4):
        assert torch.equal(results[rank]["usp_round_trip"], whole)
        assert torch.equal(results[rank]["usp_split"], _usp_share(whole, rank, 4, False))
        message = results[rank]["usp_error_length"]
        assert message is not None and "multiple of 4" in message, message
        message = results[rank]["usp_error_ulysses"]
        assert message is not None and "parallel.ulysses=3 must divide" in message, message


@pytest.mark.parametrize("heads, kv_heads, ulysses, fits", [
    (8, 8, 4, True), (8, 2, 4, True), (8, 1, 8, True), (32, 8, 16, True),
    (6, 6, 4, False), (8, 6, 4, False), (12, 3, 6, True), (12, 3, 2, False)])
def test_check_heads(heads, kv_heads, ulysses, fits):
    error = _error_of(lambda: check_heads(heads, kv_heads, ulysses))
    assert (error is None) == fits, error
    if not fits:
        assert "choose" in error and "\n" not in error


def test_bytes_per_layer():
    # 8 heads of 128, 2 ranks, 1K tokens, bf16: each exchange sends half of each rank's 512-token share
    share = 512 * 128 * 2
    assert ulysses_bytes_per_layer(1024, 8, 8, 128, 2) == 2 * (3 * 8 + 8) * share // 2
    # 2 KV heads on 4 ranks: each of the 4 ranks receives one (replicated) KV head
    assert ulysses_bytes_per_layer(1024, 8, 2, 128, 4) == ulysses_bytes_per_layer(1024, 8, 4, 128, 4)
    assert ulysses_bytes_per_layer(1024, 8, 8, 128, 1) == 0


def test_ring_and_usp_bytes_per_layer():
    # 2 ranks, 1K tokens, 8 KV heads of 128, bf16: a 512-token K, V share goes one hop in each ring
    # (2 bytes) and the fp32 dK, dV two hops
    kv_share = 2 * 512 * 8 * 128
    assert ring_bytes_per_layer(1024, 8, 128, 2) == kv_share * (2 * 2 + 2 * 4)
    # 2 x 2 USP: the all-to-alls on a ring share of 512 tokens, the ring on 4 of the 8 KV heads
    usp = usp_bytes_per_layer(1024, 8, 8, 128, ulysses=2, ring=2)
    assert usp == {"ulysses": ulysses_bytes_per_layer(512, 8, 8, 128, 2), "ring": ring_bytes_per_layer(1024, 4, 128, 2)}


def test_usp_group_ranks_follow_the_mesh():
    """dp 2 x sp 8 with Ulysses 2: Ulysses pairs of adjacent ranks, rings of ranks 2 apart, inside
    each data-parallel replica's sp group (yunchang's set_seq_parallel_pg with Ulysses low)."""
    ulysses_groups, ring_groups = usp_group_ranks([list(range(8)), list(range(8, 16))], 2)
    assert ulysses_groups == [[r, r + 1] for r in range(0, 16, 2)]
    assert ring_groups == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    with pytest.raises(ValueError, match="parallel.ulysses=3 must divide the sequence-parallel size 8"):
        usp_group_ranks([list(range(8))], 3)
