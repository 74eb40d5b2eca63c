"""Estimate the peak GPU memory per rank of a training config, before spending GPU hours.

    python -m longctx.train.plan experiment=llama3-8b_sharegpt_512k --gpus 2 --gpu-gib 141
    python -m longctx.train.plan experiment=llama3-8b_sharegpt_512k_1gpu --gpus 1 --gpu-gib 139 --host-gib 128

Counts, per rank: parameters, gradients and optimizer state under the data-parallel backend and
offload; activations under the checkpointing mode, blockwise MLP and sequence split; the chunked
loss; the sequence-parallel method's buffers; and the working memory of the largest op. Says whether it fits
and, if not, which change would make it fit. The figures are what PyTorch's caching allocator
reports as allocated (`torch.cuda.max_memory_allocated`); the CUDA context (about 0.5-1 GiB) and
fragmentation come on top, hence the headroom. The host's peak per process is planned too
(`host_estimate`: the offloaded optimizer's state, offloaded activations, CPU offload).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from longctx.parallel.data_parallel import get_backend

GIB = 2**30
HEADROOM = 0.92   # fraction of the GPU the allocated peak may take


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)   # name -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _layer_params(m) -> int:
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    # the families' extras: q/k/v biases (Qwen2), an output bias, the per-head q/k norms (Qwen3)
    extras = (q + 2 * kv) * getattr(m, "attention_bias", False) + h * getattr(m, "attention_output_bias", False) \
        + 2 * d * getattr(m, "qk_norm", False)
    return h * q * 2 + h * kv * 2 + 3 * h * m.intermediate_size + 2 * h + extras


def saved_per_token(m, a: int) -> tuple[int, int]:
    """Bytes per token that one layer keeps for its backward without checkpointing (a: bytes per
    activation element): (everything but the MLP, the MLP beyond its input)."""
    h, d, heads, kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads
    # the norms' inputs and outputs (and a scale per row), the rotated q and k, v, the attention
    # output and its log-sum-exp (the rotation keeps only the angles)
    attention = 2 * (2 * a * h + 4) + a * (2 * heads * d + 2 * kv * d) + 4 * heads
    if getattr(m, "qk_norm", False):   # Qwen3's per-head norms keep their inputs and a scale per head
        attention += (a * d + 4) * (heads + kv)
    mlp = 3 * m.intermediate_size * a   # gate, up and silu(gate) * up (ops.swiglu recomputes silu)
    return attention, mlp


# (in, out) features of each linear a LoRA adapter may target, named as in Hugging Face
def _linear_shapes(m) -> dict:
    h, q, kv, i = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim, m.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def model_of(cfg):
    """The model's real shape: with model.pretrained its config.json's (the section keeps the preset's
    shape, e.g. the tiny default), with the rope overrides; else the section itself."""
    if getattr(cfg.model, "pretrained", None):
        from .config import rope_overrides
        return _pretrained_shape(cfg.model.pretrained, json.dumps(rope_overrides(cfg.model), sort_keys=True))
    return cfg.model


@functools.lru_cache(maxsize=8)
def _pretrained_shape(path: str, overrides: str):
    """A checkpoint's shape, read once: choosing the checkpointing plans the same model many times."""
    from longctx.model.hf import load_hf_config
    return load_hf_config(path, **json.loads(overrides))


def lora_section(cfg):
    """cfg.lora when LoRA is enabled (the `lora.*` config section), else None."""
    lora = getattr(cfg, "lora", None)
    return lora if lora is not None and getattr(lora, "enabled", False) else None


def lora_trainable_params(cfg) -> int:
    """Adapter parameters (rank x (in + out) per targeted linear and layer) plus the base modules
    made trainable whole (`lora.trainable`: embeddings, norms, head)."""
    m, lora = model_of(cfg), lora_section(cfg)
    shapes = _linear_shapes(m)
    unknown = [t for t in lora.target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"lora.target_modules: {unknown} are not linears of the model ({', '.join(shapes)})")
    adapters = m.num_hidden_layers * sum(lora.rank * sum(shapes[t]) for t in lora.target_modules)
    whole = {"embed_tokens": m.vocab_size * m.hidden_size,
             "lm_head": 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size,
             "norm": (2 * m.num_hidden_layers + 1) * m.hidden_size}
    return adapters + sum(n for name, n in whole.items() if any(name in t for t in getattr(lora, "trainable", [])))


def estimate(cfg, world_size: int) -> Estimate:
    """Peak bytes per rank of one training step of `cfg` (a longctx.train.config.Config)."""
    m, t, p = model_of(cfg), cfg.train, cfg.parallel
    sp = p.sp
    n = world_size
    params = m.num_parameters()
    layer = _layer_params(m)
    pure = t.precision == "bf16_pure"
    param_bytes = 2 if pure else 4
    backend = get_backend(p.dp_backend)
    shards = backend.shards(p)
    sharded = "parameters" in shards
    offload = p.cpu_offload
    optim_offload = getattr(getattr(cfg, "optim", None), "offload", False)
    lora = lora_section(cfg)
    e = Estimate()

    # parameters (+ the all-gathered bf16 copies of about two layers while sharded)
    if sharded:
        e.parts["parameters"] = 0 if offload else params * param_bytes / n
        e.parts["gathered layers"] = 2 * layer * 2
    else:
        e.parts["parameters"] = params * param_bytes
    # gradients, in the parameters' dtype (fp32 reduction buffers for sharded backends)
    copies = backend.gradient_copies if n > 1 else 1   # DDP's buckets beside the gradients
    if lora:
        # frozen base weights have none: the adapters' (and whole trainable modules') only
        e.parts["gradients"] = lora_trainable_params(cfg) * param_bytes * copies
    elif "gradients" in shards:
        e.parts["gradients"] = 0 if offload else params * 4 / n
        e.parts["gradient buckets"] = 2 * layer * 4
    else:
        e.parts["gradients"] = params * param_bytes * copies
    # AdamW: two fp32 moments (+ an fp32 master copy for bf16 parameters); optim.offload: on the host
    trained = lora_trainable_params(cfg) if lora else params
    optim_bytes = trained * (8 + (4 if pure else 0))
    e.parts["optimizer"] = 0 if offload or optim_offload else optim_bytes / (n if "optimizer" in shards else 1)

    # activations of this rank's share of the sequence, in bytes per token (a: bytes per element)
    tokens = t.micro_batch * t.seq_len // sp
    a = 2 if t.precision in ("bf16_autocast", "bf16_pure", "auto") else 4
    h, d, heads, kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads
    mlp_tokens = min(tokens, m.mlp_chunk_size) if m.mlp_chunk_size > 0 else tokens
    attention_saved, mlp_saved = saved_per_token(m, a)
    mlp_grads = 3 * m.intermediate_size * a          # their gradients, made in the backward
    attention_grads = 4 * heads * d + 2 * a * (heads * d + 2 * kv * d)   # fp32 dq, dq/dk/dv, d(out)
    layers = m.num_hidden_layers
    layer_backward = tokens * attention_grads + mlp_tokens * mlp_grads
    # checkpointing: the last layer's recompute, before its backward starts, holds what the layer
    # saves but its input (kept already; selective keeps the mixer's too), the gradient arriving
    # from above and the MLP's output: h * a more than it saves (traced on an H100 at 512K)
    recompute = 0
    # each layer's mode: full checkpointing with train.selective_layers = k has k selective layers
    # (what `auto` chooses when some layers' mixer outputs fit but not all); the parts per mode
    # count their own layers
    mode = t.activation_checkpoint
    selective = layers if mode == "selective" else getattr(t, "selective_layers", 0) if mode == "full" else 0
    full = layers - selective if mode == "full" else 0
    # what the token mixer saves (q, k, v, output, log-sum-exp), kept by a selective layer
    mixer_saved = a * (2 * heads * d + 2 * kv * d) + 4 * heads
    if full:
        # the block inputs of every layer or group of layers (offloaded: the two in flight); one
        # layer recomputed at a time; a group in its backward has the inputs of all its k layers
        # on the device, k - 1 more than it stores (parallel/checkpoint_group.py)
        group = getattr(t, "checkpoint_group", 1)
        kept = 2 if getattr(t, "activation_offload", False) else -(-full // group)
        e.parts["activations (checkpointed inputs)"] = kept * tokens * h * a
        if group > 1:
            e.parts["activations (group in its backward)"] = (group - 1) * tokens * h * a
        # the recomputed layer: all it saves but its input, plus the gradient from above
        recompute = tokens * (attention_saved + h * a) + mlp_tokens * mlp_saved
    if selective:
        # each layer's input and what the token mixer saves stay; the rest of one layer is
        # recomputed at a time
        e.parts["activations (layer inputs, mixer kept)"] = selective * tokens * (h * a + mixer_saved)
        recompute = max(recompute, tokens * (attention_saved - mixer_saved + h * a) + mlp_tokens * mlp_saved)
    if full or selective:
        # the recomputed layer's backward: its MLP's, and about its attention gradients' size per token
        layer_backward += mlp_tokens * mlp_saved
    else:
        e.parts["activations"] = layers * (tokens * attention_saved + mlp_tokens * mlp_saved)
    lora_saved = 0   # what one layer's adapters keep beyond the base layer's saved set
    if lora:
        # each adapter keeps its rank-sized intermediate, and with dropout its dropped input (+ mask)
        per_token = sum(lora.rank * a + (_linear_shapes(m)[target][0] * (a + 1) if lora.dropout > 0 else 0)
                        for target in lora.target_modules)
        if t.activation_checkpoint == "none":
            e.parts["activations (LoRA adapters)"] = layers * tokens * per_token
        else:
            lora_saved = tokens * per_token
            layer_backward += lora_saved
    # the working memory of the step's phases; the largest counts
    chunk = min(tokens, m.loss_chunk_size)
    vocab_weight = m.vocab_size * h
    # the chunked loss: one chunk's logits (the GPU kernel turns them into their gradient in place),
    # the bf16 weight, the fp32 weight gradient and one chunk's bf16 product; the hidden states and
    # their gradient; and autocast's cache of bf16 copies of fp32 weights, which lives until the
    # forward's autocast ends
    autocast_cache = params * 2 if t.precision in ("bf16_autocast", "auto") and not sharded else 0
    # a frozen head (LoRA) gets no weight gradient
    head_grad = 0 if lora and not any("lm_head" in x or "embed" in x and m.tie_word_embeddings
                                      for x in getattr(lora, "trainable", [])) else 4
    loss = chunk * m.vocab_size * a + vocab_weight * (a + head_grad + a) + 2 * tokens * h * a + autocast_cache
    # the backward peaks in the last layer's, while every activation is still held: beside it the
    # loss's saved gradients (the output weight's in fp32, the hidden states'). The parameters'
    # gradients are made layer by layer after that, as the activations go, except DDP's and
    # DeepSpeed's buckets, which exist from the start
    backward = layer_backward + vocab_weight * head_grad + tokens * h * a
    # the optimizer step: foreach AdamW holds a temporary per tensor group; the activations are gone
    step = 0 if offload or optim_offload or lora else max(layer, vocab_weight) * 4 * 2
    gradients = e.parts["gradients"] + e.parts.get("gradient buckets", 0)
    activations = sum(v for k, v in e.parts.items() if k.startswith("activations"))
    made_in_backward = gradients if not backend.early_gradients or n == 1 else 0
    # each phase beside the parts above, which count every gradient and activation at once
    phases = {"loss": loss - gradients, "layer backward": backward - made_in_backward,
              "layer recompute": recompute + lora_saved + vocab_weight * head_grad - made_in_backward,
              "optimizer step": step - activations}
    phase = max(phases, key=phases.get)
    e.parts[f"working set ({phase})"] = max(0, phases[phase])
    # the sequence-parallel method's own buffers, as its record counts them (longctx/parallel/registry.py)
    if p.sp_method != "none" and sp > 1:
        from longctx.parallel.registry import get_method
        e.parts.update(get_method(p.sp_method).memory(m, tokens, a, p))
    return e


# the process before any tensor of ours: Python, torch, the CUDA libraries' host side (a guess made
# before the first measurement on the H200; bench/results/train_8b_h200.json has the measured peaks)
HOST_RUNTIME = 5 * GIB


def host_estimate(cfg, world_size: int) -> Estimate:
    """Peak host memory per process: the offloaded optimizer's fp32 masters, moments and pinned
    buffers, the layer inputs that activation offload keeps in pinned memory (PyTorch's caching
    host allocator rounds each block up to a power of two), what FSDP2 / DeepSpeed put on the CPU
    with parallel.cpu_offload, and the runtime."""
    from .offload_adamw import CHUNK_SIZE, DEPTH
    m, t, p = model_of(cfg), cfg.train, cfg.parallel
    params, n = m.num_parameters(), world_size
    e = Estimate(parts={"runtime (Python, torch, CUDA)": HOST_RUNTIME})
    if getattr(getattr(cfg, "optim", None), "offload", False):
        trained = lora_trainable_params(cfg) if lora_section(cfg) else params
        e.parts["optimizer (fp32 masters and moments)"] = trained * 12
        e.parts["optimizer buffers (pinned, fp32 scratch)"] = 2 * DEPTH * CHUNK_SIZE * 2 + CHUNK_SIZE * 4
    e.parts.update(get_backend(p.dp_backend).host_offload(p, params, n))
    if t.activation_checkpoint == "full" and getattr(t, "activation_offload", False):
        units = -(-m.num_hidden_layers // getattr(t, "checkpoint_group", 1))
        a = 4 if t.precision == "fp32" else 2
        block = t.micro_batch * t.seq_len // p.sp * m.hidden_size * a
        e.parts["offloaded layer inputs (pinned)"] = (units - 1) * (1 << (int(block) - 1).bit_length())
    return e


# (override, applies to (config, world size), apply): tried in this order by `suggest`
SUGGESTIONS = [
    ("train.activation_checkpoint=selective", lambda c, n: c.train.activation_checkpoint == "none",
     lambda c: setattr(c.train, "activation_checkpoint", "selective")),
    ("train.activation_checkpoint=full train.selective_layers=0",
     lambda c, n: c.train.activation_checkpoint != "full" or getattr(c.train, "selective_layers", 0),
     lambda c: (setattr(c.train, "activation_checkpoint", "full"), setattr(c.train, "selective_layers", 0))),
    ("train.activation_offload=true", lambda c, n: c.train.activation_checkpoint == "full" and not c.train.activation_offload,
     lambda c: setattr(c.train, "activation_offload", True)),
    ("model.mlp_chunk_size=8192", lambda c, n: c.model.mlp_chunk_size == 0,
     lambda c: setattr(c.model, "mlp_chunk_size", 8192)),
    # sharding needs several processes (one process runs without a data-parallel backend)
    ("parallel.dp_backend=fsdp", lambda c, n: n > 1 and not get_backend(c.parallel.dp_backend).shards(c.parallel),
     lambda c: setattr(c.parallel, "dp_backend", "fsdp")),
    ("parallel.cpu_offload=true",
     lambda c, n: n > 1 and not c.parallel.cpu_offload and "cpu_offload" in get_backend(c.parallel.dp_backend).reads,
     lambda c: setattr(c.parallel, "cpu_offload", True)),
    ("model.loss_chunk_size=2048", lambda c, n: c.model.loss_chunk_size > 2048,
     lambda c: setattr(c.model, "loss_chunk_size", 2048)),
]


class Checkpointing(NamedTuple):
    """One activation-checkpointing setting: train.activation_checkpoint, activation_offload,
    selective_layers and checkpoint_group."""
    mode: str
    offload: bool = False
    selective_layers: int = 0
    group: int = 1

    def apply(self, cfg) -> None:
        t = cfg.train
        t.activation_checkpoint, t.activation_offload = self.mode, self.offload
        t.selective_layers, t.checkpoint_group = self.selective_layers, self.group

    def describe(self) -> str:
        """In words a user can pass back ("full with train.selective_layers=12")."""
        extra = [f"train.selective_layers={self.selective_layers}"] if self.selective_layers else []
        extra += [f"train.checkpoint_group={self.group}"] if self.group > 1 else []
        extra += ["train.activation_offload=true"] if self.offload else []
        return self.mode + (f" with {' '.join(extra)}" if extra else "")


def checkpoint_candidates(layers: int) -> list[Checkpointing]:
    """Least recompute first: what `auto` tries. Between selective (every layer keeps its token
    mixer's outputs) and full (none does) lie the mixes: full with the first k layers selective, k
    from L - 1 down to 1; each layer that keeps its mixer's outputs skips a second attention pass.
    Past full: its inputs offloaded to the host (copies overlapped with compute), then groups of g
    layers storing one input each ((g - 1) / 4g more arithmetic, parallel/checkpoint_group.py),
    then both."""
    groups = range(2, layers + 1)
    return ([Checkpointing("none"), Checkpointing("selective")]
            + [Checkpointing("full", selective_layers=k) for k in range(layers - 1, 0, -1)]
            + [Checkpointing("full"), Checkpointing("full", offload=True)]
            + [Checkpointing("full", group=g) for g in groups]
            + [Checkpointing("full", offload=True, group=g) for g in groups])


def choose_checkpointing(cfg, world_size: int, gpu_gib: float, host_gib: float | None = None) -> Checkpointing:
    """The first of `checkpoint_candidates` whose planned peak fits the GPU, and, with activation
    offload, whose host plan fits `host_gib` (None: not checked); the last if none does.
    Memory falls along the mixes, so they are searched by bisection. Measured on an H100 (1B shape,
    bench/results/train_h100.json) each step down that list costs speed: 32K tokens 26.1K / 24.1K /
    21.4K tokens/s (none / selective / full), 128K (none does not fit) 9.5K / 7.9K."""
    budget = gpu_gib * GIB * HEADROOM
    trial = copy.deepcopy(cfg)

    def fits(choice: Checkpointing) -> bool:
        choice.apply(trial)
        if choice.offload and host_gib is not None and \
                host_estimate(trial, world_size).total > host_gib * GIB * HEADROOM:
            return False
        return estimate(trial, world_size).total <= budget
    candidates = checkpoint_candidates(model_of(cfg).num_hidden_layers)
    if not get_backend(cfg.parallel.dp_backend).takes_checkpoint_groups:   # train/config.py refuses them there
        candidates = [c for c in candidates if c.group == 1]
    mixes = [c for c in candidates if c.mode == "full" and c.selective_layers]   # most selective layers first
    for choice in candidates[:2]:
        if fits(choice):
            return choice
    if fits(mixes[-1]) if mixes else False:
        low, high = 0, len(mixes) - 1   # mixes[high] fits; find the first (most selective layers) that does
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(mixes[middle]) else (middle + 1, high)
        return mixes[low]
    rest = candidates[2 + len(mixes):]
    return next((choice for choice in rest if fits(choice)), rest[-1])


def resolve_checkpointing(cfg, world_size: int, gpu_gib: float, host_gib: float | None = None) -> str:
    """Replace train.activation_checkpoint=auto in `cfg` by the chosen setting; says what it chose
    ("" when there was nothing to choose). Called once, right after the config is validated
    (`longctx.train.config.resolve_auto`)."""
    if cfg.train.activation_checkpoint != "auto":
        return ""
    choice = choose_checkpointing(cfg, world_size, gpu_gib, host_gib)
    choice.apply(cfg)
    return (f"train.activation_checkpoint=auto -> {choice.describe()} "
            f"(planned {estimate(cfg, world_size).total / GIB:.1f} GiB of {gpu_gib:.0f} GiB)\n")


def suggest(cfg, world_size: int, budget: float) -> list[str]:
    """The changes, applied cumulatively in order, up to the first that fits."""
    changed = copy.deepcopy(cfg)
    steps = []
    for name, applies, apply in SUGGESTIONS:
        if not applies(changed, world_size):
            continue
        apply(changed)
        steps.append(f"{name} -> {estimate(changed, world_size).total / GIB:.1f} GiB")
        if estimate(changed, world_size).total <= budget:
            return steps
    fits_with = None
    for more_sp in (2, 4, 8, 16, 32, 64):
        c = copy.deepcopy(changed)
        c.parallel.sp = changed.parallel.sp * more_sp
        c.parallel.sp_method = "ring" if c.parallel.sp_method == "none" else c.parallel.sp_method
        if estimate(c, world_size * more_sp).total <= budget:
            fits_with = c.parallel.sp
            break
    if fits_with:
        steps.append(f"and sequence parallelism over {fits_with} GPUs (parallel.sp={fits_with})")
    else:
        steps.append("no combination tried fits: shorten train.seq_len")
    return steps


def report(cfg, world_size: int, gpu_gib: float, host_gib: float | None = None) -> str:
    e = estimate(cfg, world_size)
    budget = gpu_gib * GIB * HEADROOM
    lines = [f"memory plan per rank: {cfg.model.name}, seq_len {cfg.train.seq_len}, {world_size} GPU(s) "
             f"(dp_backend {cfg.parallel.dp_backend}, sp {cfg.parallel.sp} {cfg.parallel.sp_method})"]
    for name, value in e.parts.items():
        lines.append(f"  {name:<38}{value / GIB:9.2f} GiB")
    verdict = "fits" if e.total <= budget else "does NOT fit"
    lines.append(f"  {'total':<38}{e.total / GIB:9.2f} GiB  -> {verdict} in {gpu_gib:.0f} GiB "
                 f"({HEADROOM:.0%} usable)")
    if e.total > budget:
        lines.append("  to fit: " + "; ".join(suggest(cfg, world_size, budget)))
    host = host_estimate(cfg, world_size)
    lines.append("host memory per process:")
    for name, value in host.parts.items():
        lines.append(f"  {name:<38}{value / GIB:9.2f} GiB")
    verdict = "" if host_gib is None else (" -> fits" if host.total <= host_gib * GIB * HEADROOM else " -> does NOT fit") + \
        f" in {host_gib:.0f} GiB of host memory"
    lines.append(f"  {'total':<38}{host.total / GIB:9.2f} GiB{verdict}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python -m longctx.train.plan [hydra overrides ...] --gpus N --gpu-gib G")
    parser.add_argument("--gpus", type=int, default=None, help="processes in the run (default: dp x sp of the config)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU in GiB (H100: 80, H200: 141)")
    parser.add_argument("--host-gib", type=float, default=None, help="host memory per process in GiB, to check it too")
    args, overrides = parser.parse_known_args(argv)
    from .errors import one_line_errors, refuse_bad_overrides
    refuse_bad_overrides(overrides)   # the trainer's check: its message names the form it accepts
    with one_line_errors():
        cfg = compose_config(overrides)
        world = args.gpus or (cfg.parallel.sp * max(cfg.parallel.dp, 1))
        check_layout(cfg, world, "--gpus" if args.gpus else "the config's dp x sp")
        print(resolve_checkpointing(cfg, world, args.gpu_gib, args.host_gib) + report(cfg, world, args.gpu_gib, args.host_gib))


def compose_config(overrides: list[str]):
    """The training config of `overrides`, as the trainer composes it; a mistake Hydra or the schema
    finds is a ConfigError of one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import REPO_ROOT, ConfigError, register_configs
    register_configs()
    try:
        with initialize_config_dir(config_dir=f"{REPO_ROOT}/configs", version_base="1.3"):
            # the plan reads no data: a data set that is not installed here must not stop it
            return OmegaConf.to_object(compose("config", overrides=overrides + ["data.path=unread-by-the-planner"]))
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(" ".join(line.strip() for line in str(error).splitlines() if line.strip())) from None


def check_layout(cfg, world: int, source: str) -> None:
    """A layout the trainer would refuse is not planned: the degrees must multiply to the processes."""
    from longctx.parallel.mesh import ParallelDims

    from .config import ConfigError, _check_ranges
    p = cfg.parallel
    try:
        _check_ranges(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        ParallelDims.from_sizes(world, dp=p.dp, sp=p.sp, sp_method=p.sp_method, ulysses=p.ulysses,
                                dp_backend=p.dp_backend if world > 1 else "none")
    except ValueError as error:
        where = f"--gpus {world}: " if source == "--gpus" else ""
        raise ConfigError(f"{where}{error}; plan a layout the trainer can run") from None


if __name__ == "__main__":
    sys.exit(main())
