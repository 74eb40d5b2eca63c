"""LoRA (peft) composed with ring attention, LASP, every checkpointing mode and DDP, FSDP2 and
DeepSpeed ZeRO, on 2 gloo processes.

1. Parity: each layout trains a few optimizer steps through the train loop's own functions (the
   cases of test_data_parallel.py, with lora.enabled) and must give the losses, gradient norms and
   trained parameters (adapters and norms) of one process training LoRA on the same global batch:
   within a few times the error of a float32 single-process run against a float64 one.
2. The trainer (`train(cfg)`, real data) from one Hugging Face checkpoint under DDP, FSDP2 (the
   checkpoint's weights sent into a sharded meta model whose projections carry adapters) and ZeRO-2/3:
   resume continues exactly under each backend from checkpoints without the frozen base; losses and
   exports agree across backends.

One spawn runs everything.
"""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_distributed
from test_data_parallel import (TRAINER_BACKENDS, _train_case, compose_config, losses, make_config, plain_config,
                                rel_err, single_process, straight_and_resumed)
from longctx.model import Llama, ModelConfig, save_hf
from longctx.model.lora import apply_lora, is_adapter_key

WORLD, RANK, ALPHA = 2, 4, 8.0
CHECKPOINTING = [("none", False), ("selective", False), ("full", False), ("full", True)]
# name: (dp, sp, sp_method, backend, zero_stage, activation_checkpoint, activation_offload[, parallel.cpu_offload])
CASES = {f"sp2-ring/ddp/{mode}{'+offload' if offload else ''}": (1, 2, "ring", "ddp", 0, mode, offload)
         for mode, offload in CHECKPOINTING}
CASES.update({
    "sp2-lasp/ddp": (1, 2, "lasp", "ddp", 0, "none", False),
    "sp2-ring/fsdp/full": (1, 2, "ring", "fsdp", 0, "full", False),
    "dp2/ddp": (2, 1, "none", "ddp", 0, "none", False),
    "dp2/fsdp": (2, 1, "none", "fsdp", 0, "none", False),
    "dp2/zero2": (2, 1, "none", "deepspeed", 2, "none", False),
    "dp2/zero3": (2, 1, "none", "deepspeed", 3, "selective", False),
    "dp2/fsdp/cpu_offload": (2, 1, "none", "fsdp", 0, "none", False, True),
    "dp2/zero2/cpu_offload": (2, 1, "none", "deepspeed", 2, "none", False, True),
})


# bf16 compute over fp32 masters (FSDP2's policy, DeepSpeed's bf16 mode): adapters over a bf16 base
BF16_CASES = {"dp2/fsdp/bf16": (2, 1, "none", "fsdp", 0, "none", False),
              "dp2/zero2/bf16": (2, 1, "none", "deepspeed", 2, "none", False)}


def lora_case(dp, sp, method, backend, stage, checkpointing, offload, cpu_offload=False):
    cfg = make_config(dp, sp, method, backend, stage)
    cfg.train.activation_checkpoint, cfg.train.activation_offload = checkpointing, offload
    cfg.parallel.cpu_offload = cpu_offload
    lora = cfg.lora
    lora.enabled, lora.rank, lora.alpha, lora.trainable = True, RANK, ALPHA, ["norm"]
    return cfg


def trained(state: dict) -> torch.Tensor:
    """The parameters LoRA trains (adapters and norms), flattened: the frozen base, equal
    everywhere, would hide their errors."""
    return torch.cat([state[k].double().flatten() for k in sorted(state)
                      if is_adapter_key(k) or k.endswith("norm.weight")])


def trainer_configs(root) -> list:
    """Per backend: 4 steps saving every 2 (adapters merged into hf/), and a run resumed from its step 2."""
    pretrained = root / "pretrained"
    save_hf(Llama(ModelConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)), pretrained)
    common = [f"model.pretrained={pretrained}", "train.seq_len=64", "train.grad_accum=2", "train.precision=fp32",
              # optim.eps as in test_data_parallel.make_config: Adam's first steps would turn rounding
              # noise in near-zero gradients into +-lr moves
              "train.device=cpu", "model.attention=sdpa", "optim.warmup_steps=1", "optim.lr=1e-2", "optim.eps=1e-4",
              "logging.progress_bar=false", "checkpoint.every=2", "train.steps=4", "lora.enabled=true",
              f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.trainable=[norm]"]
    return straight_and_resumed(root, common)


# `python -m longctx.check` with LoRA under ring attention: its one-device reference gets the same adapters
CHECK_OVERRIDES = ["parallel=ring", "lora.enabled=true", "lora.trainable=[norm]", "train.seq_len=64",
                   "train.precision=fp32", "train.device=cpu", "model.attention=sdpa"]


def _worker(rank, world, seed, cases, configs, check_config):
    import importlib
    from longctx.check import check
    from longctx.train.train import train
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None   # see test_data_parallel
    results = {name: _train_case(rank, world, cfg, seed, state) for name, cfg, state in cases}
    for cfg in configs:
        train(cfg)
    results["check"] = check(check_config)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_parallel")
    # fresh inputs each run; LONGCTX_TEST_SEED=<seed from a failure message> repeats one
    seed = int(os.environ.get("LONGCTX_TEST_SEED") or torch.randint(0, 2**31 - 1, ()).item())
    cases, references = [], {}
    for name, layout in {**CASES, **BF16_CASES}.items():
        cfg = lora_case(*layout)
        cfg.train.seed = seed   # the adapters' draw (the trainer seeds them with train.seed)
        if name in BF16_CASES:
            cfg.train.precision = "bf16_pure"
        torch.manual_seed(seed)
        model = apply_lora(Llama(plain_config(cfg)), RANK, ALPHA, trainable=["norm"], seed=cfg.train.seed)
        state = {k: v.clone() for k, v in model.state_dict().items()}   # FSDP2's start: rank 0's
        references[name] = {dtype: single_process(cfg, seed, cfg.parallel.dp, dtype)
                            for dtype in (torch.float32, torch.float64)}
        cases.append((name, cfg, state))
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)   # the PyTorch paths of ring attention and LASP
    try:
        configs = trainer_configs(root)
        check_config = compose_config(CHECK_OVERRIDES + [f"model.pretrained={root / 'pretrained'}"])
        results = run_distributed(_worker, WORLD, seed, cases, configs, check_config)
    finally:
        mp.undo()
    return seed, results, references, root


@pytest.mark.parametrize("name", list(CASES))
def test_lora_steps_match_one_process(runs, name):
    seed, results, references, _ = runs
    ref32, ref64 = references[name][torch.float32], references[name][torch.float64]
    for rank, result in enumerate(results):
        got = result[name]
        for what in ("losses", "norms"):
            error, floor = rel_err(got[what], ref64[what]), rel_err(ref32[what], ref64[what])
            assert error <= 4 * floor + 1e-6, f"{name} rank {rank} {what}: {got[what]} vs {ref64[what]} (seed {seed})"
    state = results[0][name]["state"]
    assert set(state) - {"lm_head.weight"} == set(ref64["state"]) - {"lm_head.weight"}
    error, floor = rel_err(trained(state), trained(ref64["state"])), rel_err(trained(ref32["state"]), trained(ref64["state"]))
    assert error <= 4 * floor + 1e-6, f"{name}: trained parameters differ by {error:.2e} (fp32 run: {floor:.2e}, seed {seed})"
    # the adapters did train: every B (peft starts it at zero) has moved
    assert all(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)


@pytest.mark.parametrize("name", list(BF16_CASES))
def test_lora_bf16_pure_trains_fp32_adapters_close_to_one_process(runs, name):
    seed, results, references, _ = runs
    got, ref64 = results[0][name], references[name][torch.float64]
    assert got["master_dtypes"] == {"torch.float32"}, got["master_dtypes"]   # the optimizer steps fp32 adapters
    error = rel_err(got["losses"], ref64["losses"])
    assert error < 2e-2, f"{name} bf16 losses {got['losses']} vs {ref64['losses']} (seed {seed})"
    fp32 = results[0][name.replace("/bf16", "")]
    assert got["losses"] != fp32["losses"]   # the forward did run in bf16
    error = rel_err(trained(got["state"]), trained(ref64["state"]))
    assert error < 5e-2, f"{name}: trained parameters differ by {error:.2e} (seed {seed})"
    assert all(got["state"][k].abs().sum() > 0 for k in got["state"] if ".lora_B." in k)


@pytest.mark.parametrize("backend", list(TRAINER_BACKENDS))
def test_trainer_lora_resume_is_exact(runs, backend):
    root = runs[3]
    straight, resumed = losses(root / f"{backend}_straight"), losses(root / f"{backend}_resumed")
    assert sorted(straight) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert straight[3] == resumed[3]   # bitwise on CPU: computed from the checkpointed adapters
    # DDP regroups its gradient buckets after a process's first backward (see test_data_parallel)
    assert resumed[4] == (pytest.approx(straight[4], rel=1e-6) if backend == "ddp" else straight[4])
    # the checkpoints (DCP, or DeepSpeed's files) leave the frozen base out: a tenth of it at most here
    checkpoint = size(root / f"{backend}_straight" / "checkpoints" / "step_00000004")
    assert checkpoint < size(root / "pretrained") / 10, (checkpoint, size(root / "pretrained"))


def size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_trainer_lora_backends_agree_with_ddp(runs, backend):
    """ZeRO draws the adapters as DDP does (whole, from train.seed, whatever building the base
    drew): same training. FSDP2 draws them on its shards (per rank on a CPU, DTensor's generator on a GPU), so only its
    first step, where B is still zero, must equal DDP's: the pretrained base arrived whole in the
    sharded model under the adapted names."""
    root = runs[3]
    ours, ddp = losses(root / f"{backend}_straight"), losses(root / "ddp_straight")
    assert ours.keys() == ddp.keys() and len(set(ddp.values())) == len(ddp)   # the adapters train
    for step in [1] if backend == "fsdp" else ddp:
        assert abs(ours[step] - ddp[step]) <= 1e-5 * abs(ddp[step]), (step, ours[step], ddp[step])
    for folder in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        a, b = load_file(root / f"{backend}_straight" / folder), load_file(root / "ddp_straight" / folder)
        assert a.keys() == b.keys()
        if backend == "fsdp":
            continue
        for key in a:
            error = ((a[key] - b[key]).norm() / b[key].norm().clamp(min=1e-30)).item()
            assert error < 1e-4, f"{backend} {folder} {key}: differs from DDP's by {error:.2e}"


def test_check_runs_lora_against_one_device(runs):
    from longctx.check import format_report
    report = runs[1][0]["check"]
    assert report["ok"], format_report(report)
    assert report["layout"] == "dp=1 x sp=2" and report["update_rel_diff"] < 1e-4, format_report(report)
