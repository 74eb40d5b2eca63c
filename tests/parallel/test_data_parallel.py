"""DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 composed with ring attention and LASP, on 4 gloo processes.

1. Parity: each layout (dp=2 x sp=2 with ring attention, dp=2 x sp=2 with LASP, dp=4 x sp=1) under
   each backend trains a few optimizer steps (two micro-batches each, packed documents, masked
   labels) through the train loop's own functions, and must give the losses and parameters of one
   process training on the same global batch: the error against a float64 run must stay within a
   few times the error of a float32 single-process run.
2. The trainer (`train(cfg)`, real data) under DDP, FSDP2 and ZeRO-3 at dp=2 x sp=2, started from
   one Hugging Face checkpoint: save and resume under the same backend continues exactly; losses
   and exported Hugging Face weights agree across backends.
3. ZeRO-3 builds the model partitioned (deepspeed.zero.Init): no rank ever holds more than one
   parameter whole, the seeded random initialisation is the single process's, buffers stay fp32
   under bf16, and a Hugging Face folder loads into the partitions to the plain model's logits,
   loss and gradient norm (with activation checkpointing).

One spawn runs everything (spawning 4 processes is most of the cost).
"""
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distributed import run_distributed
from longctx.model import Llama, ModelConfig, save_hf
from longctx.model.llama import positions_from_cu_seqlens
from longctx.ops.cross_entropy import IGNORE_INDEX
from longctx.parallel.mesh import ParallelDims
from longctx.train.config import REPO_ROOT, Config, register_configs

SEQ_LEN, GRAD_ACCUM, STEPS, VOCAB = 64, 2, 2, 128
BACKENDS = [("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]
LAYOUTS = {"dp2-sp2-ring": (2, 2, "ring"), "dp2-sp2-lasp": (2, 2, "lasp"), "dp4-sp1": (4, 1, "none")}
# bf16 compute over fp32 master weights: FSDP2's mixed-precision policy, DeepSpeed's bf16 mode
BF16_BACKENDS = [("fsdp", 0), ("deepspeed", 2)]
# parallel.cpu_offload: FSDP2 parameters, gradients and optimizer; ZeRO's optimizer (ZeRO-3: parameters too)
OFFLOAD_BACKENDS = [("fsdp", 0), ("deepspeed", 2), ("deepspeed", 3)]


def model_section(cfg: Config, sp_method: str) -> None:
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_hidden_layers = VOCAB, 32, 64, 2
    m.num_attention_heads, m.num_key_value_heads, m.tie_word_embeddings = 4, 2, True
    m.attention, m.loss_chunk_size = "sdpa", 32
    # LASP shards linear-attention layers; its softmax layers attend over contiguous shards
    m.layer_types = ["linear", "softmax"] if sp_method == "lasp" else None


def make_config(dp, sp, sp_method, backend, zero_stage) -> Config:
    cfg = Config()
    model_section(cfg, sp_method)
    cfg.parallel.dp, cfg.parallel.sp, cfg.parallel.sp_method = dp, sp, sp_method
    cfg.parallel.dp_backend, cfg.parallel.zero_stage = backend, zero_stage
    t = cfg.train
    t.seq_len, t.micro_batch, t.grad_accum, t.precision, t.device = SEQ_LEN, 1, GRAD_ACCUM, "fp32", "cpu"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.grad_clip = 1e-2, 1, "constant", 1.0
    # With eps 1e-8 Adam moves a parameter whose gradient is rounding noise by +-lr, by the noise's
    # sign: parameters compared after a few steps then differ by the count of such sign flips, not
    # by the size of the gradients' errors (one seed in several failed a 4 x fp32 bound that way).
    # Gradients below 1e-4 now move their parameter in proportion; larger ones as Adam does.
    cfg.optim.eps = 1e-4
    return cfg


def plain_config(cfg: Config) -> ModelConfig:
    from longctx.train.config import model_fields
    return ModelConfig(**model_fields(cfg.model))


def global_batches(seed: int, sequences: int):
    """STEPS x GRAD_ACCUM batches of `sequences` rows (the dp ranks' rows): packed documents
    with random cuts, some labels masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS * GRAD_ACCUM):
        ids = torch.randint(0, VOCAB, (sequences, SEQ_LEN), generator=g)
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=g) < 0.2] = IGNORE_INDEX
        bounds = [0]
        for row in range(sequences):
            cuts = sorted((torch.randperm(SEQ_LEN - 1, generator=g)[:2] + 1).tolist())
            bounds += [row * SEQ_LEN + c for c in cuts] + [(row + 1) * SEQ_LEN]
        cu = torch.tensor(bounds, dtype=torch.int32)
        out.append({"input_ids": ids, "labels": labels, "cu_seqlens": cu,
                    "position_ids": positions_from_cu_seqlens(cu, ids.shape)})
    return out


def row(batch: dict, r: int) -> dict:
    """Row r as a batch of one sequence (cu_seqlens rebased)."""
    cu = batch["cu_seqlens"]
    lo, hi = r * SEQ_LEN, (r + 1) * SEQ_LEN
    mine = cu[(cu >= lo) & (cu <= hi)] - lo
    return {"input_ids": batch["input_ids"][r:r + 1], "labels": batch["labels"][r:r + 1],
            "position_ids": batch["position_ids"][r:r + 1], "cu_seqlens": mine.to(torch.int32)}


# ------------------------------------------------------------------------------------------------
# every rank: the real train-step functions under each backend
# ------------------------------------------------------------------------------------------------
def _train_case(rank, world, cfg, seed, reference_state):
    from contextlib import nullcontext
    import longctx.train.train as T
    from longctx.parallel import data_parallel
    from longctx.parallel.mesh import ParallelDims
    p = cfg.parallel
    dims = ParallelDims(world, p.dp, p.sp, p.sp_method, p.dp_backend)
    mesh = dims.build_mesh("cpu")
    device = torch.device("cpu")
    torch.manual_seed(seed)   # DDP and DeepSpeed: the reference's initialisation
    model, train_model, optimizer, scheduler = T.build_train_model(cfg, dims, mesh, device)
    if p.dp_backend == "fsdp":  # a sharded meta model: rank 0's full weights sent to every shard
        data_parallel.load_full_state(train_model, reference_state if rank == 0 else None)
    dp_rank = mesh["dp"].get_local_rank()
    batches = global_batches(seed, dims.dp)
    losses, norms = [], []
    for step in range(STEPS):
        micro = [T.shard_batch(row(batches[step * GRAD_ACCUM + i], dp_rank), dims, device)
                 for i in range(GRAD_ACCUM)]
        loss = T.forward_backward(train_model, micro, dims.world_size, nullcontext())
        norm, finite = data_parallel.optimizer_step(train_model, optimizer, cfg.optim.grad_clip)
        assert finite
        scheduler.step()
        losses.append(loss.item())
        norms.append(float(norm))
    master_dtypes = {str(p.dtype) for group in optimizer.param_groups for p in group["params"]}
    return {"losses": losses, "norms": norms, "state": data_parallel.full_state_dict(train_model),
            "master_dtypes": master_dtypes}


def _meta_init_case(world):
    """FSDP2 from scratch: the model is built on the meta device and each rank initialises only
    its shards; return the gathered weights (rank 0)."""
    import longctx.train.train as T
    from longctx.parallel import data_parallel
    from longctx.parallel.mesh import ParallelDims
    cfg = make_config(world, 1, "none", "fsdp", 0)
    dims = ParallelDims(world, world, 1, "none", "fsdp")
    _, train_model, _, _ = T.build_train_model(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
    return data_parallel.full_state_dict(train_model)


def _fsdp_gathered_after_forward_case(world):
    """FSDP2 with bf16 compute, resharding after forward: which parameters each module holds
    between the forward and the backward (True: the gathered tensor with its storage), and
    whether the backward then ran (the root's backward must not depend on its pre-backward hook:
    torch < 2.14 hooked only what `tree_flatten` found in the output)."""
    import longctx.train.train as T
    from torch.distributed.tensor import DTensor
    cfg = make_config(world, 1, "none", "fsdp", 0)
    cfg.train.precision = "bf16_pure"
    dims = ParallelDims(world, world, 1, "none", "fsdp")
    model, train_model, _, _ = T.build_train_model(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
    batch = T.shard_batch(row(global_batches(0, 1)[0], 0), _ONE, torch.device("cpu"))
    out = train_model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                      labels=batch["labels"], labels_shifted=True)
    gathered = {name: not isinstance(param, DTensor) and param.untyped_storage().nbytes() > 0
                for name, param in model.named_parameters()}
    out.loss.backward()
    return {"gathered": gathered, "grads": all(p.grad is not None for p in model.parameters())}


def _zero3_build_case(world, seed):
    """Build under ZeRO-3 (no engine yet) in fp32 and in bf16 with a LASP layer (a decay buffer);
    return what each rank holds, the gathered weights and the buffers."""
    import deepspeed
    from torch.nn.modules.module import register_module_parameter_registration_hook
    import longctx.train.train as T
    from longctx.parallel import data_parallel
    results = {}
    for precision, sp_method in (("fp32", "none"), ("bf16_pure", "lasp")):
        cfg = make_config(world, 1, sp_method, "deepspeed", 3)
        cfg.train.precision = precision
        config = data_parallel.deepspeed_config(3, 1, GRAD_ACCUM, precision, cfg.optim.grad_clip)
        made, whole = [], []   # the parameters made so far; the elements they hold whole as each is made

        def count(module, name, param):
            made.append(param)
            whole.append(sum(p.numel() for p in made))   # a partitioned parameter's data is empty
        handle = register_module_parameter_registration_hook(count)
        torch.manual_seed(seed)
        try:
            model = T.build_model(cfg, torch.device("cpu"), zero3_config=config)
        finally:
            handle.remove()
        held, state = {}, {}
        for name, param in model.named_parameters():
            held[name] = {"numel": param.numel(), "partition": param.ds_tensor.numel(), "ds_numel": param.ds_numel,
                          "dtype": param.ds_tensor.dtype}
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().clone()
        results[precision] = {"held": held, "max_whole": max(whole), "state": state,
                              "buffers": {k: v.clone() for k, v in model.named_buffers()}}
    return results


def _zero3_pretrained_case(world, folder):
    """A Hugging Face folder loaded into ZeRO-3 partitions through the trainer (full activation
    checkpointing): logits, then one step's loss and gradient norm on the same row on every rank
    (the mean over the world is that row's), and the loaded weights gathered back."""
    from contextlib import nullcontext
    import longctx.train.train as T
    from longctx.parallel import data_parallel
    from longctx.parallel.mesh import ParallelDims
    cfg = make_config(world, 1, "none", "deepspeed", 3)
    cfg.model.pretrained, cfg.train.activation_checkpoint = str(folder), "full"
    dims = ParallelDims(world, world, 1, "none", "deepspeed")
    mesh = dims.build_mesh("cpu")
    device = torch.device("cpu")
    _, train_model, optimizer, _ = T.build_train_model(cfg, dims, mesh, device)
    loaded = data_parallel.full_state_dict(train_model)
    batch = row(global_batches(0, 1)[0], 0)
    with torch.no_grad():
        logits = train_model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = T.forward_backward(train_model, [T.shard_batch(batch, dims, device)], world, nullcontext())
    norm, _ = data_parallel.optimizer_step(train_model, optimizer, cfg.optim.grad_clip)
    return {"logits": logits, "loss": loss.item(), "norm": float(norm), "loaded": loaded}


def _worker(rank, world, seed, cases, trainer_configs, check_config, zero3_folder):
    from longctx.check import check
    from longctx.train.train import train
    # DeepSpeed compiles a shared-memory all-reduce op for CPU runs on first use (minutes on 2
    # cores, then cached); gloo does the same job here
    import importlib   # (the attribute deepspeed.comm.torch is the torch package, not the module)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    results = {}
    for name, cfg, reference_state in cases:
        results[name] = _train_case(rank, world, cfg, seed, reference_state)
    results["meta_init"] = _meta_init_case(world)
    results["fsdp_after_forward"] = _fsdp_gathered_after_forward_case(world)
    results["zero3_build"] = _zero3_build_case(world, seed)
    results["zero3_pretrained"] = _zero3_pretrained_case(world, zero3_folder)
    for cfg in trainer_configs:
        train(cfg)
    results["check"] = check(check_config)
    # the classic bug: labels shifted within each shard after the split, not on the whole
    # sequence before it; the check must catch it
    import longctx.train.train as T
    from longctx.model.llama import shift_labels
    real = T.shard_batch

    def shard_then_shift(batch, dims, device):
        local = real(batch, dims, device)
        if dims.sp > 1:
            local["labels"] = shift_labels(dims.split(batch["labels"], dim=1)).to(device)
        return local
    T.shard_batch = shard_then_shift
    try:
        results["check_broken"] = check(check_config)
    finally:
        T.shard_batch = real
    return results


def single_process(cfg: Config, seed: int, dp: int, dtype):
    """One process, the whole global batch (every dp rank's rows as micro-batches)."""
    from contextlib import nullcontext
    import longctx.train.train as T
    from longctx.parallel import data_parallel
    torch.manual_seed(seed)
    model = Llama(plain_config(cfg))
    if cfg.lora.enabled:   # (test_lora_parallel.py) as the trainer applies them
        from longctx.model.lora import apply_lora
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.trainable,
                   seed=cfg.train.seed)
    model = model.to(dtype)
    optimizer, scheduler = T.build_optimizer(model, cfg)
    batches = global_batches(seed, dp)
    losses, norms = [], []
    for step in range(STEPS):
        micro = [T.shard_batch(row(batches[step * GRAD_ACCUM + i], r), _ONE, torch.device("cpu"))
                 for i in range(GRAD_ACCUM) for r in range(dp)]
        loss = T.forward_backward(model, micro, 1, nullcontext())
        norm, _ = data_parallel.optimizer_step(model, optimizer, cfg.optim.grad_clip)
        scheduler.step()
        losses.append(loss.item())
        norms.append(float(norm))
    return {"losses": losses, "norms": norms, "state": {k: v.detach() for k, v in model.state_dict().items()}}


_ONE = ParallelDims(world_size=1, dp=1, sp=1, dp_backend="none")


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in sorted(state) if k != "lm_head.weight"])


# ------------------------------------------------------------------------------------------------
# the trainer: resume and cross-backend runs
# ------------------------------------------------------------------------------------------------
TRAINER_BACKENDS = {"ddp": ["parallel.dp_backend=ddp"], "fsdp": ["parallel.dp_backend=fsdp"],
                    "zero2": ["parallel.dp_backend=deepspeed", "parallel.zero_stage=2"],
                    "zero3": ["parallel.dp_backend=deepspeed", "parallel.zero_stage=3"]}
TRAINER_STEPS, LR = 4, 1e-3


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def trainer_configs(root) -> list:
    """Per backend: 4 steps saving every 2, and a run resumed from the first run's step 2."""
    pretrained = root / "pretrained"
    save_hf(Llama(ModelConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)), pretrained)
    common = [f"model.pretrained={pretrained}", "train.seq_len=64", "train.grad_accum=2", "train.precision=fp32",
              "train.device=cpu", "model.attention=sdpa", "parallel.sp=2", "parallel.sp_method=ring",
              "optim.warmup_steps=1", f"optim.lr={LR}", "logging.progress_bar=false", "checkpoint.every=2",
              f"train.steps={TRAINER_STEPS}"]
    return straight_and_resumed(root, common)


def straight_and_resumed(root, common: list) -> list:
    """Per backend of TRAINER_BACKENDS: the run `common` describes, and one resumed from its step 2."""
    configs = []
    for name, overrides in TRAINER_BACKENDS.items():
        straight = root / f"{name}_straight"
        configs.append(compose_config(common + overrides + [f"run_dir={straight}"]))
        configs.append(compose_config(common + overrides + [f"run_dir={root / f'{name}_resumed'}",
                                                            f"train.resume={straight}/checkpoints/step_00000002"]))
    return configs


# `python -m longctx.check` with ZeRO-2 and ring attention (the other backends are covered above)
CHECK_OVERRIDES = ["parallel=deepspeed", "parallel.zero_stage=2", "parallel.sp=2", "parallel.sp_method=ring",
                   "train.seq_len=64", "train.precision=fp32", "train.device=cpu", "model.attention=sdpa"]


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def exported(run_dir) -> dict:
    return load_file(run_dir / "hf" / "model.safetensors")


# ------------------------------------------------------------------------------------------------
# the one spawn
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_parallel")
    # fresh inputs each run; LONGCTX_TEST_SEED=<seed from a failure message> repeats one
    seed = int(os.environ.get("LONGCTX_TEST_SEED") or torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    configs = trainer_configs(root)
    cases, references = [], {}
    for layout, (dp, sp, method) in LAYOUTS.items():
        base = make_config(dp, sp, method, "ddp", 0)
        torch.manual_seed(seed)
        state = {k: v.clone() for k, v in Llama(plain_config(base)).state_dict().items()}
        references[layout] = {dtype: single_process(base, seed, dp, dtype) for dtype in (torch.float32, torch.float64)}
        for backend, stage in BACKENDS:
            cases.append((f"{layout}/{backend}{stage or ''}", make_config(dp, sp, method, backend, stage), state))
        if layout == "dp2-sp2-ring":
            for backend, stage in BF16_BACKENDS:
                cfg = make_config(dp, sp, method, backend, stage)
                cfg.train.precision = "bf16_pure"
                cases.append((f"{layout}/{backend}{stage or ''}/bf16", cfg, state))
            for backend, stage in OFFLOAD_BACKENDS:
                cfg = make_config(dp, sp, method, backend, stage)
                cfg.parallel.cpu_offload = True
                cases.append((f"{layout}/{backend}{stage or ''}/offload", cfg, state))
            cfg = make_config(dp, sp, method, "fsdp", 0)
            cfg.parallel.reshard_after_forward = False
            cases.append((f"{layout}/fsdp/no_reshard", cfg, state))
            cfg = make_config(dp, sp, method, "fsdp", 0)   # recomputation inside FSDP2's per-layer units
            cfg.train.activation_checkpoint = "selective"
            cases.append((f"{layout}/fsdp/selective", cfg, state))
        if layout == "dp2-sp2-lasp":
            cfg = make_config(dp, sp, method, "ddp", 0)
            cfg.parallel.sp_method = "lasp_allgather"
            cases.append((f"{layout}/ddp/allgather", cfg, state))
    # the PyTorch paths of ring attention and LASP (the Triton interpreter is slow and tested elsewhere)
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        check_config = compose_config(CHECK_OVERRIDES + [f"model.pretrained={root / 'pretrained'}"])
        results = run_distributed(_worker, 4, seed, cases, configs, check_config, zero3_folder(root))
    finally:
        mp.undo()
    return seed, results, references, root


def zero3_folder(root):
    """A small Hugging Face folder with an untied head (the trainer's has a tied one)."""
    cfg = make_config(4, 1, "none", "deepspeed", 3)
    cfg.model.tie_word_embeddings = False
    save_hf(Llama(plain_config(cfg)), root / "zero3_pretrained")
    return root / "zero3_pretrained"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", [f"{b}{s or ''}" for b, s in BACKENDS])
def test_steps_match_one_process(runs, layout, backend):
    assert_matches_one_process(runs, layout, f"{layout}/{backend}")


@pytest.mark.parametrize("backend", [f"{b}{s or ''}" for b, s in OFFLOAD_BACKENDS])
def test_cpu_offload_steps_match_one_process(runs, backend):
    assert_matches_one_process(runs, "dp2-sp2-ring", f"dp2-sp2-ring/{backend}/offload")


def test_fsdp_without_reshard_after_forward_matches_one_process(runs):
    assert_matches_one_process(runs, "dp2-sp2-ring", "dp2-sp2-ring/fsdp/no_reshard")


def test_fsdp_with_selective_checkpointing_matches_one_process(runs):
    assert_matches_one_process(runs, "dp2-sp2-ring", "dp2-sp2-ring/fsdp/selective")


def test_lasp_allgather_variant_matches_one_process(runs):
    assert_matches_one_process(runs, "dp2-sp2-lasp", "dp2-sp2-lasp/ddp/allgather")


def assert_matches_one_process(runs, layout, name):
    seed, results, references, _ = runs
    ref32, ref64 = references[layout][torch.float32], references[layout][torch.float64]
    for rank, result in enumerate(results):
        got = result[name]
        # every rank reports the global loss and gradient norm
        for what in ("losses", "norms"):
            error, floor = rel_err(got[what], ref64[what]), rel_err(ref32[what], ref64[what])
            assert error <= 4 * floor + 1e-6, f"{name} rank {rank} {what}: {got[what]} vs {ref64[what]} (seed {seed})"
    state = results[0][name]["state"]
    assert set(state) - {"lm_head.weight"} == set(ref64["state"]) - {"lm_head.weight"}
    error = rel_err(flat(state), flat(ref64["state"]))
    floor = rel_err(flat(ref32["state"]), flat(ref64["state"]))
    assert error <= 4 * floor + 1e-6, f"{name}: parameters differ by {error:.2e} (fp32 run: {floor:.2e}, seed {seed})"
    for rank in range(1, 4):
        assert results[rank][name]["state"] is None  # only rank 0 gathers the full state


@pytest.mark.parametrize("backend", list(TRAINER_BACKENDS))
def test_trainer_resume_continues_exactly(runs, backend):
    root = runs[3]
    straight, resumed = losses(root / f"{backend}_straight"), losses(root / f"{backend}_resumed")
    assert sorted(straight) == list(range(1, TRAINER_STEPS + 1)) and sorted(resumed) == [3, 4]
    assert straight[3] == resumed[3]   # bitwise on CPU: computed from the checkpointed state
    if backend == "ddp":
        # the resumed step 3 reduces its gradients in DDP's first-backward buckets (see below), so
        # step 4 starts from weights equal up to float32 rounding; its loss agrees to that rounding
        assert resumed[4] == pytest.approx(straight[4], rel=1e-6)
    else:
        assert straight[4] == resumed[4]
    a, b = exported(root / f"{backend}_straight"), exported(root / f"{backend}_resumed")
    assert a.keys() == b.keys()
    for key in a:
        if backend == "ddp":
            # DDP regroups its gradient buckets after a process's first backward, so the resumed
            # run's first step sums gradients in other groupings: equal up to float32 rounding (which
            # Adam can lift to a small fraction of one step, lr, where a gradient is tiny)
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-3 * LR, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_trainer_backends_agree_with_ddp(runs, backend):
    """Same pretrained weights (FSDP2: read by rank 0 and scattered), same data: same training,
    and the Hugging Face export of every backend holds the same weights."""
    root = runs[3]
    ours, ddp = losses(root / f"{backend}_straight"), losses(root / "ddp_straight")
    assert ours.keys() == ddp.keys()
    for step in ddp:
        assert abs(ours[step] - ddp[step]) <= 1e-5 * abs(ddp[step]), (step, ours[step], ddp[step])
    a, b = exported(root / f"{backend}_straight"), exported(root / "ddp_straight")
    assert a.keys() == b.keys()
    for key in a:
        error = ((a[key] - b[key]).norm() / b[key].norm()).item()
        assert error < 1e-4, f"{key}: exported weights differ from DDP's by {error:.2e}"


def test_check_passes_a_right_layout_and_fails_a_broken_one(runs):
    from longctx.check import format_report
    results = runs[1]
    report = results[0]["check"]
    assert report["ok"], format_report(report)
    assert report["layout"] == "dp=2 x sp=2" and report["dp_backend"] == "deepspeed"
    assert report["loss_rel_diff"] < 1e-5 and report["grad_norm_rel_diff"] < 1e-4
    assert all(r["check"] == {} for r in results[1:])   # rank 0 reports
    broken = results[0]["check_broken"]
    # at a random initialisation every label costs about log(vocab): the loss hardly moves, the
    # gradients do
    assert not broken["ok"] and broken["update_rel_diff"] > broken["update_tolerance"], format_report(broken)
    assert "FAIL" in format_report(broken)


@pytest.mark.parametrize("backend", [f"{b}{s or ''}" for b, s in BF16_BACKENDS])
def test_bf16_pure_trains_fp32_masters_close_to_one_process(runs, backend):
    seed, results, references, _ = runs
    got, fp32 = results[0][f"dp2-sp2-ring/{backend}/bf16"], results[0][f"dp2-sp2-ring/{backend}"]
    assert got["master_dtypes"] == {"torch.float32"}, got["master_dtypes"]   # the optimizer steps fp32 weights
    ref64 = references["dp2-sp2-ring"][torch.float64]
    error = rel_err(got["losses"], ref64["losses"])
    assert error < 2e-2, f"{backend} bf16 losses {got['losses']} vs {ref64['losses']} (seed {seed})"
    assert got["losses"] != fp32["losses"]   # the forward did run in bf16


def test_fsdp_meta_init_draws_every_shard_apart(runs):
    state = runs[1][0]["meta_init"]
    std = Config().model.initializer_range
    for name in ("layers.0.mlp.up_proj.weight", "embed_tokens.weight"):
        shards = state[name].chunk(4)   # FSDP2 shards dim 0 over the 4 ranks
        for i in range(4):
            assert abs(shards[i].std().item() - std) < 0.2 * std, (name, i)
            for j in range(i):
                assert not torch.equal(shards[i], shards[j]), f"{name}: shards {j} and {i} hold the same numbers"
    assert torch.equal(state["layers.0.input_layernorm.weight"], torch.ones(32))


def test_fsdp_keeps_the_root_gathered_from_forward_to_backward(runs):
    """Decoder layers reshard after their forward (the last one excepted: its backward comes
    next); the root (embeddings, final norm, tied head) stays gathered for its backward."""
    for rank, result in enumerate(runs[1]):
        got = result["fsdp_after_forward"]
        gathered = got["gathered"]
        assert gathered["norm.weight"] and gathered["embed_tokens.weight"], (rank, gathered)
        assert not gathered["layers.0.input_layernorm.weight"] and not gathered["layers.0.mlp.up_proj.weight"]
        assert gathered["layers.1.input_layernorm.weight"], (rank, gathered)
        assert got["grads"], rank


def test_zero3_builds_the_model_partitioned(runs):
    """Right after building (before the engine) every rank holds only its partition of every
    parameter, and never more than one parameter whole while the model was made."""
    results = runs[1]
    world = len(results)
    for precision in ("fp32", "bf16_pure"):
        for rank, result in enumerate(results):
            built = result["zero3_build"][precision]
            held = built["held"]
            for name, h in held.items():
                assert h["numel"] == 0, (precision, rank, name, h)   # a partitioned parameter's data is empty
                assert h["partition"] == -(-h["ds_numel"] // world), (precision, rank, name, h)
            assert built["max_whole"] <= max(h["ds_numel"] for h in held.values()), (precision, rank)
            assert {h["dtype"] for h in held.values()} == {torch.float32 if precision == "fp32" else torch.bfloat16}


def test_zero3_random_init_is_the_single_process_one(runs):
    from longctx.model.linear_attention import head_decays
    from longctx.model.rotary import rope_inv_freq
    seed, results = runs[0], runs[1]
    for precision, sp_method in (("fp32", "none"), ("bf16_pure", "lasp")):
        config = plain_config(make_config(4, 1, sp_method, "deepspeed", 3))
        torch.manual_seed(seed)
        reference = Llama(config)
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        for rank, result in enumerate(results):
            built = result["zero3_build"][precision]
            for name, param in reference.named_parameters():
                assert torch.equal(built["state"][name], param.detach().to(dtype)), (precision, rank, name)
            # the engine keeps buffers in fp32 under bf16: so must a model built partitioned
            buffers = built["buffers"]
            assert buffers["inv_freq"].dtype == torch.float32 and torch.equal(buffers["inv_freq"], rope_inv_freq(config))
            if sp_method == "lasp":
                decay = buffers["layers.0.self_attn.decay"]
                assert decay.dtype == torch.float32 and torch.equal(decay, head_decays(config.num_attention_heads))


def test_zero3_loads_a_hugging_face_folder_into_partitions(runs):
    from longctx.model import load_hf
    from longctx.model.hf import load_hf_state_dict
    results, root = runs[1], runs[3]
    folder = root / "zero3_pretrained"
    model = load_hf(folder, attention="sdpa", loss_chunk_size=32)
    batch = row(global_batches(0, 1)[0], 0)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                 labels=batch["labels"]).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    for rank, result in enumerate(results):
        got = result["zero3_pretrained"]
        torch.testing.assert_close(got["logits"], logits, msg=f"rank {rank}")
        assert abs(got["loss"] - loss.item()) <= 1e-6 * loss.item(), (rank, got["loss"], loss.item())
        assert abs(got["norm"] - norm.item()) <= 1e-5 * norm.item(), (rank, got["norm"], norm.item())
    loaded, saved = results[0]["zero3_pretrained"]["loaded"], load_hf_state_dict(folder)
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
