#!/usr/bin/env python
"""Benchmark LASP on several GPUs against lightning attention on one GPU, and the longest trainable
sequence of a 1B linear-attention model. Launch with torchrun, one process per GPU:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node 2 scripts/bench_lasp_parallel.py --section lasp --section model

Section `lasp`: 16 heads, head dim 128, bf16, batch 1, forward+backward, total sequence 1M and 4M
tokens (each GPU holds a contiguous N-th). Rows: `lasp` (ring and allgather variants) on N GPUs;
on one GPU our kernel and flash-linear-attention's `chunk_lightning_attn` over the whole sequence
(every rank runs the one-GPU baselines at once on its own GPU, no collectives, the max is kept); and
our kernel on one shard alone (`lasp_local_shard`), which is the floor LASP adds its corrections and
communication to. Outputs and gradients of LASP are first checked against our kernel on one GPU.
Times: CUDA events around a fixed number of steps (the same on every rank), max over ranks.

Section `model`: a LLaMA-3.2-1B-shaped model with every layer linear attention (LASP ring), bf16,
activation checkpointing per layer, one forward+backward step (no optimizer) at growing total
lengths until memory runs out; rows give ms, tokens/s and peak memory.

Writes {"device","torch","triton","commit","command","rows"} to
bench/results/lasp_parallel_<device>x<N>.json after every row (an out-of-memory abort keeps what ran).
Needs CUDA GPUs; imports nothing beyond torch, triton, fla and longctx (model, ops, parallel).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longctx.ops.linear import lightning_attn_func  # noqa: E402
from longctx.parallel import lasp  # noqa: E402
from longctx.parallel.sequence import split_sequence  # noqa: E402
from benchlib import print_rows, rel_err, result_head  # noqa: E402

HEADS, HEAD_DIM = 16, 128
LASP_SEQLENS = [1 << 20, 1 << 22]
MODEL_SEQLENS_PER_GPU = [1 << 18, 1 << 19, 3 << 18, 1 << 20, 3 << 19]


def lightning_flops(seqlen, heads, dk, dv, mode="fwd_bwd", chunk=64):
    """The same nominal count as bench_lasp.py's kernel section."""
    forward = seqlen * heads * (2 * chunk * dk + 2 * chunk * dv + 4 * dk * dv)
    return forward * (3 if mode == "fwd_bwd" else 1)


def decays(heads):
    """fla's chunk_lightning_attn decay for layer 0 of 24, as bench_lasp.py uses."""
    return 8 / heads * torch.arange(heads, dtype=torch.float32, device="cuda")


class Recorder:
    def __init__(self, args, world):
        self.rows, self.rank, self.world = [], (dist.get_rank() if dist.is_initialized() else 0), world
        device = torch.cuda.get_device_name()
        slug = device.lower().replace("nvidia", "").strip().split()[0]
        self.path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "results",
                                             f"lasp_parallel_{slug}x{world}.json")
        self.head = result_head(device, (f"torchrun --nproc_per_node {world} " if world > 1 else "python ")
                                + " ".join(sys.argv))
        self.kept, self.section = [], None
        if os.path.exists(self.path):  # rows of sections that do not run this time stay
            with open(self.path) as f:
                self.kept = [r for r in json.load(f).get("rows", []) if r.get("section") not in args.sections]

    def add(self, row, echo=True):
        if row.get("section") is None:
            row["section"] = self.section
        self.rows.append(row)
        if self.rank == 0:
            if echo:
                print(json.dumps(row), flush=True)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump({**self.head, "rows": self.kept + self.rows}, f, indent=1)


def max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def time_steps(step, warmup: int, iters: int) -> tuple[float, float]:
    """(ms per step, peak GiB above the memory in use before), max over ranks; fixed counts on every rank."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return max_over_ranks(ms), max_over_ranks(peak)


def inputs(seqlen, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
               for _ in range(3))
    do = torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, do


def check_lasp(world, rank):
    """LASP's shard of the output and gradients against our kernel on the whole sequence, bf16, with
    packed documents crossing the shard boundaries and a mild decay so that the passed state counts."""
    failures = []
    seqlen = 65536
    q, k, v, do = inputs(seqlen, seed=1)
    decay = decays(HEADS) / 64 + 1e-4
    cu = torch.tensor([0, 1000, seqlen // world + 77, seqlen - 5000, seqlen], dtype=torch.int32, device="cuda")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = lightning_attn_func(*leaves, decay, cu_seqlens=cu)
    out.backward(do)
    want = [split_sequence(x, None, dim=1, layout="contiguous") for x in [out] + [x.grad for x in leaves]]
    for variant in lasp.VARIANTS:
        local = [split_sequence(x, None, dim=1, layout="contiguous").requires_grad_() for x in (q, k, v)]
        got = lasp.lasp_attn_func(*local, decay, None, cu_seqlens=cu, variant=variant)
        got.backward(split_sequence(do, None, dim=1, layout="contiguous"))
        errs = [rel_err(g, w) for g, w in zip([got] + [x.grad for x in local], want)]
        errs = [max_over_ranks(e) for e in errs]
        line = f"check lasp {variant} vs one GPU: " + " ".join(f"{n}={e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errs))
        if rank == 0:
            print(line, flush=True)
        if not all(e < 2e-2 for e in errs):  # bf16 operands: errors of a few 1e-3 expected
            failures.append(line)
    return failures


def load_fla():
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
        return chunk_lightning_attn
    except Exception:
        traceback.print_exc()
        return None


def _measure(rec, row, tokens, step, iters):
    """Time `step` into `row` (or record its out-of-memory) and add the row."""
    try:
        ms, peak = time_steps(step, warmup=2, iters=iters)
        row.update(ms=round(ms, 3), tok_s=round(tokens / ms * 1e3), peak_gib=round(peak, 2),
                   tflops=round(lightning_flops(tokens, HEADS, HEAD_DIM, HEAD_DIM) / ms / 1e9, 1))
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"OutOfMemoryError: {str(error)[:160]}"
    torch.cuda.empty_cache()
    rec.add(row)
    return row


def _lasp_rows(rec, shape, world, rank, iters):
    """This rank's shard: our kernel alone, then LASP in both variants (all tensors freed on return)."""
    seqlen = shape["seqlen"]
    decay = decays(HEADS)
    *leaves, do = inputs(seqlen // world, seed=rank)
    leaves = [x.requires_grad_() for x in leaves]
    local = _measure(rec, {"bench": "lasp_local_shard", "impl": "longctx", **shape, "gpus": 1}, seqlen // world,
                     lambda: lightning_attn_func(*leaves, decay)[0].backward(do), iters)
    for variant in lasp.VARIANTS:
        row = _measure(rec, {"bench": "lasp", "impl": "longctx", **shape, "gpus": world, "variant": variant}, seqlen,
                       lambda: lasp.lasp_attn_func(*leaves, decay, None, variant=variant).backward(do), iters)
        if "ms" in local and "ms" in row:
            row["overhead_vs_local_ms"] = round(row["ms"] - local["ms"], 3)


def _one_gpu_rows(rec, shape, fla, iters):
    """The whole sequence on one GPU (every rank at once on its own GPU; no collective inside a timed step)."""
    seqlen = shape["seqlen"]
    decay = decays(HEADS)
    try:
        *leaves, do = inputs(seqlen)
        fits = 1.0
    except torch.cuda.OutOfMemoryError:
        leaves = do = None
        fits = 0.0
        torch.cuda.empty_cache()
    if -max_over_ranks(-fits) < 1:  # decided together: the timings below hold collectives
        del leaves, do
        torch.cuda.empty_cache()
        for impl in ["longctx"] + (["fla"] if fla is not None else []):
            rec.add({"bench": "lasp", "impl": impl, **shape, "gpus": 1, "variant": "one_gpu",
                     "error": "OutOfMemoryError: the whole sequence's inputs do not fit on one GPU"})
        return {}
    leaves = [x.requires_grad_() for x in leaves]
    steps = {"longctx": lambda: lightning_attn_func(*leaves, decay)[0].backward(do)}
    if fla is not None:
        steps["fla"] = lambda: fla(*leaves, layer_idx=0, num_layers=24, scale=1.0)[0].backward(do)
    single = {}
    for impl, step in steps.items():
        for x in leaves:
            x.grad = None
        torch.cuda.empty_cache()
        single[impl] = _measure(rec, {"bench": "lasp", "impl": impl, **shape, "gpus": 1, "variant": "one_gpu"},
                                seqlen, step, iters)
    return single


def bench_lasp(args, rec, world, rank):
    failures = check_lasp(world, rank)
    fla = load_fla()
    for seqlen in args.seqlens or LASP_SEQLENS:
        shape = {"seqlen": seqlen, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bf16", "mode": "fwd_bwd"}
        iters = 10 if seqlen <= (1 << 20) else 4
        _lasp_rows(rec, shape, world, rank, iters)
        torch.cuda.empty_cache()
        single = _one_gpu_rows(rec, shape, fla, iters)
        torch.cuda.empty_cache()
        base = single.get("longctx", {}).get("tok_s")
        for row in rec.rows:
            if row["bench"] == "lasp" and row["seqlen"] == seqlen and row["gpus"] == world and base and "tok_s" in row:
                row["scaling_eff"] = round(row["tok_s"] / (world * base), 3)
                row["speedup_vs_one_gpu"] = round(row["tok_s"] / base, 2)
                if "tok_s" in single.get("fla", {}):
                    row["speedup_vs_fla_one_gpu"] = round(row["tok_s"] / single["fla"]["tok_s"], 2)
        rec.add(rec.rows.pop(), echo=False)  # rewrite the file with the efficiencies
    return failures


def bench_model(args, rec, world, rank):
    """Longest trainable sequence of a 1B all-linear model on `world` GPUs (LASP ring; one GPU: lightning)."""
    import torch.utils.checkpoint as checkpoint

    import longctx.model.linear_attention  # noqa: F401  (registers the one-GPU "lightning" mixer)
    from longctx.model import Llama, ModelConfig
    config = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         layer_types=["linear"] * 16, linear_attention="lasp" if world > 1 else "lightning",
                         loss_chunk_size=8192)
    with torch.device("cuda"):
        model = Llama(config).to(torch.bfloat16)
    for layer in model.layers:  # activation checkpointing per decoder layer
        layer._plain_forward = layer.forward
        layer.forward = (lambda *a, _f=layer._plain_forward: checkpoint.checkpoint(_f, *a, use_reentrant=False))
    params = sum(p.numel() for p in model.parameters())
    started = time.time()
    seqlens = args.model_seqlens or [n * world for n in MODEL_SEQLENS_PER_GPU]
    first = seqlens[0]  # compiles and warms up; the larger lengths run one timed step each
    for seqlen in seqlens:
        row = {"bench": "train_step", "impl": "longctx", "model": "llama3.2-1b-shape all-linear", "params": params,
               "seqlen": seqlen, "gpus": world, "dtype": "bf16", "mode": "fwd_bwd", "activation_checkpoint": True}
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, seqlen), device="cuda")
        local = split_sequence(ids, None, dim=1, layout="contiguous")
        positions = split_sequence(torch.arange(seqlen, device="cuda")[None], None, dim=1, layout="contiguous")

        def step():
            loss = model(local, position_ids=positions, labels=local, labels_shifted=True,
                         loss_reduction="sum").loss / seqlen
            loss.backward()
            for p in model.parameters():
                p.grad = None
        try:
            ms, peak = time_steps(step, warmup=1 if seqlen == first else 0, iters=1)
            row.update(ms=round(ms, 1), tok_s=round(seqlen / ms * 1e3), peak_gib=round(peak, 2),
                       total_gib=round(max_over_ranks(torch.cuda.max_memory_allocated() / 2**30), 2))
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = f"OutOfMemoryError: {str(error)[:160]}"
        rec.add(row)
        torch.cuda.empty_cache()
        if "error" in row or time.time() - started > args.model_budget_s:
            break
    return []


def bench_lasp_one_gpu(args, rec, world, rank):
    """Section `lasp_sim`, for one GPU when no multi-GPU machine is to be had: what a middle rank of
    N = 2 does, timed piece by piece on one GPU. Rows: our kernel (and fla) on the whole sequence;
    our kernel on one shard; `lasp_attn_func` on one shard with world 1 (LASP's phased kernel calls:
    a rank's work but for its state messages: two chains of N-1 messages of B*H*Dk*Dv*4 = 1 MiB,
    not measured here)."""
    fla = load_fla()
    simulated = 2
    failures = []
    q, k, v, do = inputs(65536, seed=3)
    decay = decays(HEADS) / 64 + 1e-4
    results = []
    for fn in (lambda *a: lightning_attn_func(*a, decay)[0], lambda *a: lasp.lasp_attn_func(*a, decay, None)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(do)
        results.append([out] + [x.grad for x in leaves])
    errs = [rel_err(a, b) for a, b in zip(*results)]
    line = "check lasp_attn_func (one rank) vs lightning_attn_func: " + " ".join(f"{e:.1e}" for e in errs)
    print(line, flush=True)
    if not all(e < 1e-3 for e in errs):
        failures.append(line)
    del q, k, v, do, results
    for seqlen in args.seqlens or LASP_SEQLENS:
        shard = seqlen // simulated
        shape = {"seqlen": seqlen, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bf16", "mode": "fwd_bwd"}
        iters = 10 if seqlen <= (1 << 20) else 4
        decay = decays(HEADS)

        def measure(bench, impl, tokens, step, extra=None):
            row = {"bench": bench, "impl": impl, **shape, "gpus": 1, **(extra or {})}
            return _measure(rec, row, tokens, step, iters)

        q, k, v, do = inputs(shard)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        local = measure("lasp_local_shard", "longctx", shard,
                        lambda: lightning_attn_func(*leaves, decay)[0].backward(do), {"shard_of": simulated})
        through = measure("lasp_local_shard", "longctx_lasp_fn", shard,
                          lambda: lasp.lasp_attn_func(*leaves, decay, None).backward(do), {"shard_of": simulated})
        if "ms" in through:
            projected = through["ms"]
            rec.add({"bench": "lasp_projected", "impl": "longctx", **shape, "gpus": simulated,
                     "ms": round(projected, 3), "tok_s": round(seqlen / projected * 1e3),
                     "note": "a rank's time from one GPU: lasp_attn_func on its shard; the 1 MiB state messages "
                             "(two chains of N-1 hops) not included"})
        del q, k, v, do, leaves
        torch.cuda.empty_cache()
        try:
            full = inputs(seqlen)
        except torch.cuda.OutOfMemoryError:
            rec.add({"bench": "lasp", "impl": "longctx", **shape, "gpus": 1, "variant": "one_gpu",
                     "error": "OutOfMemoryError: the whole sequence's inputs do not fit"})
            torch.cuda.empty_cache()
            continue
        full_leaves = [x.requires_grad_() for x in full[:3]]
        one_gpu = {"longctx": lambda: lightning_attn_func(*full_leaves, decay)[0].backward(full[3])}
        if fla is not None:
            one_gpu["fla"] = lambda: fla(*full_leaves, layer_idx=0, num_layers=24, scale=1.0)[0].backward(full[3])
        for impl, step in one_gpu.items():
            for x in full_leaves:
                x.grad = None
            torch.cuda.empty_cache()
            row = measure("lasp", impl, seqlen, step, {"variant": "one_gpu"})
            projected = [r for r in rec.rows if r["bench"] == "lasp_projected" and r["seqlen"] == seqlen]
            if projected and "tok_s" in row:
                projected[0][f"speedup_vs_{impl}_one_gpu"] = round(projected[0]["tok_s"] / row["tok_s"], 2)
        rec.add(rec.rows.pop(), echo=False)
        del full, full_leaves, one_gpu, step
        torch.cuda.empty_cache()
    return failures


SECTIONS = {"lasp": bench_lasp, "model": bench_model, "lasp_sim": bench_lasp_one_gpu}


def print_table(rows):
    print_rows(rows, [("bench", 18, lambda r: r["bench"]), ("impl", 9, lambda r: r["impl"]),
                      ("variant", 10, lambda r: r.get("variant", "")), ("gpus", 5, lambda r: r["gpus"]),
                      ("seqlen", 9, lambda r: r["seqlen"]), ("ms", 10, lambda r: f"{r['ms']:.2f}"),
                      ("Mtok/s", 9, lambda r: f"{r['tok_s'] / 1e6:.2f}"), ("GiB", 8, lambda r: f"{r['peak_gib']:.1f}"),
                      ("eff", 7, lambda r: r.get("scaling_eff", ""))], named_by=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS), help="sections to run (torchrun: lasp, model; one process: lasp_sim, model)")
    parser.add_argument("--seqlens", type=int, nargs="*", help="total lengths of section lasp")
    parser.add_argument("--model-seqlens", type=int, nargs="*", help="total lengths of section model")
    parser.add_argument("--model-budget-s", type=float, default=120.0, help="stop growing the model after this")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    args.sections = None
    world, rank = 1, 0
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=180),
                                device_id=torch.device("cuda", local_rank))
        world, rank = dist.get_world_size(), dist.get_rank()
    elif "lasp" in (args.section or []):
        parser.error("section lasp needs several processes: launch with torchrun (or run --section lasp_sim)")
    args.sections = args.section or (["lasp", "model"] if world > 1 else ["lasp_sim", "model"])
    rec = Recorder(args, world)
    failures = []
    for name in args.sections:
        rec.section = name
        failures += SECTIONS[name](args, rec, world, rank)
    if rank == 0:
        print_table(rec.rows)
        print(f"wrote {rec.path}")
        if failures:
            print("CHECK FAILURES:\n" + "\n".join(failures))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
