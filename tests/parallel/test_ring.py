"""Ring attention on 2, 4 and 8 gloo processes against single-process float64 attention.

Every spawned run batches many cases (spawning is the cost). Each case draws fresh random inputs
of the whole sequence in the parent; the ranks take their zigzag shares, run ring attention forward
and backward, and return their local output and q, k, v gradients, which must equal the zigzag
shares of the float64 reference's. Documents are random cuts (odd lengths, crossing the shards).
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton cases run the kernel on the CPU

import pytest
import torch

from distributed import run_distributed
from longctx.ops.attention.naive import attention_reference
from longctx.parallel.ring import ring_attn_func, ring_plan
from longctx.parallel.sequence import split_sequence, zigzag_chunk_ids

FLOAT64_TOL = 1e-10  # relative (norm) error: float64 round-off is ~1e-15


# ------------------------------------------------------------------------------------------------
# inputs and the reference
# ------------------------------------------------------------------------------------------------
def _random_documents(batch, seqlen, docs_per_row, gen):
    """cu_seqlens of the flattened (batch x seqlen) sequence: random cuts, rows start documents."""
    bounds = []
    for row in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=gen)[:docs_per_row - 1] + 1
        bounds += [row * seqlen + c for c in [0] + sorted(cuts.tolist())]
    return torch.tensor(bounds + [batch * seqlen], dtype=torch.int32)


def make_case(batch, seqlen, heads, kv_heads, head_dim, causal, docs=0, dtype=torch.float64, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
    shape_q, shape_kv = (batch, seqlen, heads, head_dim), (batch, seqlen, kv_heads, head_dim)
    case = {name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            for name, shape in (("q", shape_q), ("k", shape_kv), ("v", shape_kv), ("dout", shape_q))}
    case["causal"] = causal
    case["cu_seqlens"] = _random_documents(batch, seqlen, docs, gen) if docs else None
    return case


def reference(case):
    """Float64 output and gradients of the whole sequence, with an explicit (S, S) mask."""
    q, k, v = (case[n].double().requires_grad_() for n in ("q", "k", "v"))
    batch, seqlen, heads, head_dim = q.shape
    rep = heads // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2)) / math.sqrt(head_dim)
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool)
    if case["causal"]:
        visible = visible.tril()
    visible = visible.expand(batch, seqlen, seqlen)
    if case["cu_seqlens"] is not None:
        starts = case["cu_seqlens"][:-1].long()
        doc = (torch.searchsorted(starts, torch.arange(batch * seqlen), right=True) - 1).view(batch, seqlen)
        visible = visible & (doc[:, :, None] == doc[:, None, :])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.repeat_interleave(rep, 2))
    grads = torch.autograd.grad(out, (q, k, v), case["dout"].double())
    return [out.detach(), *grads]


def zigzag_share(x, rank, world_size):
    chunks = x.chunk(2 * world_size, dim=1)
    first, second = zigzag_chunk_ids(rank, world_size)
    return torch.cat([chunks[first], chunks[second]], dim=1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------------
# what each rank runs
# ------------------------------------------------------------------------------------------------
def low_precision_reference(case):
    """Output and gradients of the plain PyTorch attention in the inputs' dtype (whole sequence)."""
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    cu = case["cu_seqlens"]
    if cu is None:
        out, _ = attention_reference(q, k, v, causal=case["causal"])
    else:
        flat = [x.flatten(0, 1) for x in (q, k, v)]
        out, _ = attention_reference(*flat, causal=case["causal"], cu_seqlens_q=cu, cu_seqlens_k=cu)
        out = out.view(q.shape)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), case["dout"])]


def _run_case(case, group):
    q, k, v, dout = (split_sequence(case[n], group).requires_grad_(n != "dout") for n in ("q", "k", "v", "dout"))
    # the blocks on the backend the case names: auto is the torch backend on a CPU
    out = ring_attn_func(q, k, v, group, causal=case["causal"], cu_seqlens=case["cu_seqlens"],
                         backend=case.get("impl", "auto"))
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


# ------------------------------------------------------------------------------------------------
# a whole model step: ring on N processes against the single-process model
# ------------------------------------------------------------------------------------------------
def make_model_case(seqlen, docs, labels_upto=None):
    from longctx.model import Llama, ModelConfig
    config = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    model = Llama(ModelConfig(**config, attention="sdpa"))
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ()).item()))
    input_ids = torch.randint(96, (1, seqlen), generator=gen)
    labels = torch.randint(96, (1, seqlen), generator=gen)
    labels[torch.rand(1, seqlen, generator=gen) < 0.2] = -100
    if labels_upto is not None:  # valid labels only near the start: some ranks hold none
        labels[:, labels_upto:] = -100
    return dict(config=config, state=model.state_dict(), input_ids=input_ids, labels=labels,
                cu_seqlens=_random_documents(1, seqlen, docs, gen) if docs else None)


def model_reference(case):
    """Loss (mean over valid tokens) and parameter gradients of the single-process model."""
    from longctx.model import Llama, ModelConfig
    model = Llama(ModelConfig(**case["config"], attention="sdpa"))
    model.load_state_dict(case["state"])
    out = model(case["input_ids"], cu_seqlens=case["cu_seqlens"], labels=case["labels"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _model_step(case, group):
    """The sequence-parallel train step: shift labels on the whole sequence, split ids, labels and
    global positions alike, sum the local loss, divide by the global count of valid tokens."""
    import torch.distributed as dist
    from longctx.model import Llama, ModelConfig
    from longctx.model.llama import positions_from_cu_seqlens, shift_labels
    from longctx.parallel.mesh import sequence_dims
    from longctx.parallel.parallelize import apply_sequence_parallel
    model = Llama(ModelConfig(**case["config"], attention="torch"))
    model.load_state_dict(case["state"])
    apply_sequence_parallel(model, sequence_dims("ring", group))
    # the user's backend stays in the config; the layers name the method's mixer, which runs on it
    assert model.config.attention == "torch"
    assert [layer.self_attn.sequence_mixer for layer in model.layers] == ["ring"] * len(model.layers)
    input_ids, cu = case["input_ids"], case["cu_seqlens"]
    labels = shift_labels(case["labels"])
    positions = (positions_from_cu_seqlens(cu, input_ids.shape) if cu is not None
                 else torch.arange(input_ids.shape[1]).view(1, -1))
    local = [split_sequence(x, group) for x in (input_ids, labels, positions)]
    count = (labels != -100).sum()
    out = model(local[0], position_ids=local[2], cu_seqlens=cu, labels=local[1],
                labels_shifted=True, loss_reduction="sum")
    local_loss = out.loss / count
    local_loss.backward()
    loss = local_loss.detach().clone()
    dist.all_reduce(loss, group=group)
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)  # what data parallelism over the sp ranks does
        grads[name] = p.grad
    return loss, grads, local_loss.detach()


def _worker(rank, world_size, cases, mesh_cases, model_cases=None):
    results = {name: _run_case(case, None) for name, case in cases.items()}
    for name, case in (model_cases or {}).items():
        results[name] = _model_step(case, None)
    if mesh_cases:
        # data parallel x sequence parallel: each dp rank runs its own batch round its sp ring
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "sp"))
        dp_rank, sp_group = mesh.get_local_rank("dp"), mesh["sp"].get_group()
        for name, per_dp in mesh_cases.items():
            results[name] = _run_case(per_dp[dp_rank], sp_group)
    try:  # a share that is not two equal chunks
        x = torch.randn(1, 5, 2, 4)
        ring_attn_func(x, x, x)
        results["odd_error"] = None
    except ValueError as error:
        results["odd_error"] = str(error)
    return results


def _check_results(results, cases, world_size, mesh_cases=None, sp_size=None):
    for name, case in cases.items():
        expected = reference(case)
        if case["q"].dtype == torch.float64:
            tolerances = [FLOAT64_TOL] * 4
        else:  # the Triton kernel: within 2x the error of plain PyTorch attention in that dtype, plus
            # one rounding (in fp32 both errors are a few eps, and fresh inputs each run)
            eps = torch.finfo(case["q"].dtype).eps
            tolerances = [2 * rel_err(low, e) + eps for low, e in zip(low_precision_reference(case), expected)]
        for rank, got in enumerate(results):
            for what, g, e, tol in zip(("out", "dq", "dk", "dv"), got[name], expected, tolerances):
                err = rel_err(g, zigzag_share(e, rank, world_size))
                assert err < tol, f"{name}: rank {rank} {what} relative error {err:.2e} (allowed {tol:.2e})"
    for name, per_dp in (mesh_cases or {}).items():
        for dp_rank, case in enumerate(per_dp):
            expected = reference(case)
            for sp_rank in range(sp_size):
                got = results[dp_rank * sp_size + sp_rank][name]
                for what, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
                    err = rel_err(g, zigzag_share(e, sp_rank, sp_size))
                    assert err < FLOAT64_TOL, f"{name}: dp {dp_rank} sp {sp_rank} {what} error {err:.2e}"
    for rank_results in results:
        message = rank_results["odd_error"]
        assert message is not None and "pad" in message and "odd" in message, message


# fp16 inputs: the error against float64 may not grow with the ring. The floor is the error of the
# float64 result rounded to fp16; one process (the ring of one, i.e. single-device attention with
# fp32 accumulation) lands near it, and N processes must land where one does: rounding the partial
# outputs to fp16 between steps would add error at every step.
FP16_SHAPE = dict(batch=1, seqlen=64, heads=4, kv_heads=2, head_dim=16, causal=True, dtype=torch.float16)


def _fp16_errors(results_per_rank, case, world_size):
    """Relative error of (out, dq, dk, dv) over the fp16 rounding floor."""
    expected = reference(case)
    order = torch.cat([zigzag_share(torch.arange(case["q"].shape[1]).view(1, -1), r, world_size)
                       for r in range(world_size)], dim=1)[0]
    errors = []
    for index, e in enumerate(expected):
        whole = torch.empty_like(e)
        whole[:, order] = torch.cat([res[index].double() for res in results_per_rank], dim=1)
        errors.append(rel_err(whole, e) / rel_err(e.half(), e))
    return errors


def _assert_fp16(results_per_rank, case, world_size):
    one = _fp16_errors([_run_case(case, None)], case, 1)
    many = _fp16_errors(results_per_rank, case, world_size)
    for what, ratio_one, ratio in zip(("out", "dq", "dk", "dv"), one, many):
        assert ratio_one < 1.5, f"one process fp16 {what}: error {ratio_one:.2f} x the fp16 rounding floor"
        assert ratio < 1.03 * ratio_one, (f"fp16 {what}: error grows with the ring: {ratio:.3f} on "
                                          f"{world_size} processes, {ratio_one:.3f} on one (x rounding floor)")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_ring_two_processes():
    cases = {
        "causal": make_case(1, 16, 2, 2, 8, causal=True),
        "full": make_case(2, 12, 2, 2, 8, causal=False),
        "gqa": make_case(1, 20, 4, 1, 8, causal=True),
        "docs_odd": make_case(1, 20, 4, 2, 8, causal=True, docs=4),      # chunks of 5
        "docs_span": make_case(1, 20, 2, 2, 8, causal=True, docs=2),
        "docs_batch": make_case(2, 12, 2, 1, 8, causal=True, docs=3),
        "docs_full": make_case(1, 28, 2, 2, 8, causal=False, docs=3),
        "fp16": make_case(**FP16_SHAPE),
        # the Triton kernel's low level (interpreted), as on a GPU
        "triton_fp16_docs": dict(make_case(1, 40, 4, 2, 16, causal=True, docs=3, dtype=torch.float16), impl="triton"),
        "triton_fp32": dict(make_case(2, 32, 2, 1, 16, causal=True, dtype=torch.float32), impl="triton"),
    }
    model_cases = {"model_docs": make_model_case(24, docs=3),
                   "model_few_labels": make_model_case(16, docs=0, labels_upto=4)}
    fp16 = cases.pop("fp16")
    results = run_distributed(_worker, 2, {**cases, "fp16": fp16}, None, model_cases)
    _check_results(results, cases, 2)
    _assert_fp16([r["fp16"] for r in results], fp16, 2)
    for name, case in model_cases.items():
        loss, grads = model_reference(case)
        for rank, (got_loss, got_grads, local_loss) in enumerate(r[name] for r in results):
            assert torch.isfinite(local_loss), f"{name}: rank {rank} local loss {local_loss}"
            assert rel_err(got_loss, loss) < 1e-5, f"{name}: rank {rank} loss {got_loss} != {loss}"
            for param, g in grads.items():
                err = rel_err(got_grads[param], g)
                assert err < 1e-4, f"{name}: rank {rank} grad of {param} relative error {err:.2e}"
    # labels valid only in the first chunk (rank 0's): rank 1 holds no label token
    assert results[1]["model_few_labels"][2] == 0


def test_ring_four_processes_and_dp_sp_mesh():
    cases = {
        "causal": make_case(1, 24, 2, 2, 8, causal=True),
        "gqa_docs": make_case(1, 24, 4, 2, 8, causal=True, docs=5),       # chunks of 3
        "full_docs": make_case(1, 16, 2, 1, 8, causal=False, docs=3),
        "fp16": make_case(**FP16_SHAPE),
    }
    mesh_cases = {"mesh": [make_case(1, 12, 2, 1, 8, causal=True, docs=2) for _ in range(2)]}
    fp16 = cases.pop("fp16")
    results = run_distributed(_worker, 4, {**cases, "fp16": fp16}, mesh_cases)
    _check_results(results, cases, 4, mesh_cases, sp_size=2)
    _assert_fp16([r["fp16"] for r in results], fp16, 4)


def test_ring_eight_processes():
    cases = {"gqa_docs": make_case(1, 32, 2, 1, 4, causal=True, docs=5)}
    results = run_distributed(_worker, 8, cases, None)
    _check_results(results, cases, 8)


def test_plan_balances_causal_work():
    """Zigzag: every rank does the same attention work at every step (no documents)."""
    world, local = 4, 16
    for step in range(world):
        work = set()
        for rank in range(world):
            blocks = ring_plan(rank, world, local, causal=True)[step]
            work.add(sum((b.q_rows[1] - b.q_rows[0]) * (b.k_rows[1] - b.k_rows[0]) / (2 if b.causal else 1)
                         for b in blocks))
        assert len(work) == 1, f"step {step}: unequal work {work}"


def test_plan_rejects_local_cu_seqlens():
    with pytest.raises(ValueError, match="whole"):
        ring_plan(0, 2, 8, True, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="crosses"):
        ring_plan(0, 2, 4, True, batch=2, cu_seqlens=torch.tensor([0, 3, 10, 16], dtype=torch.int32))
