"""The offloaded optimizer: the same updates as torch's AdamW on fp32 masters, bf16 weights that
are the masters' rounding, exact resume through the Checkpointer and the train loop, and the
config errors around it."""
import pytest
import torch

from longctx.train.checkpoint import Checkpointer
from longctx.train.config import ConfigError, validate
from longctx.parallel.parallelize import bf16_parameters
from longctx.train.offload_adamw import OffloadedAdamW
from longctx.train.train import train
from test_train import SMALL, compose_config, losses


def bf16_model(seed):
    torch.manual_seed(seed)
    return bf16_parameters(torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 7)))


def groups(model):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    return [{"params": matrices, "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def set_fresh_gradients(*param_lists):
    """The same random bf16 gradient for the i-th parameter of every list (fp32 where it is)."""
    for params in zip(*param_lists):
        grad = torch.randn(params[0].shape).to(torch.bfloat16)
        for p in params:
            p.grad = grad.to(p.dtype)


@pytest.mark.parametrize("chunk_size, depth", [(1 << 20, 2), (97, 2), (64, 3)], ids=["whole", "chunk97", "chunk64-depth3"])
def test_updates_equal_torch_adamw_on_fp32_masters(chunk_size, depth):
    model = bf16_model(0)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ours = OffloadedAdamW(groups(model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, chunk_size=chunk_size, depth=depth)
    ref_groups = groups(model)
    by_id = {id(p): m for p, m in zip(model.parameters(), masters)}
    for g in ref_groups:
        g["params"] = [by_id[id(p)] for p in g["params"]]
    reference = torch.optim.AdamW(ref_groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        for optimizer in (ours, reference):   # a scheduler changes the rate between steps
            for g in optimizer.param_groups:
                g["lr"] = 3e-3 * (step + 1) / 4
        set_fresh_gradients(list(model.parameters()), masters)
        ours.step()
        reference.step()
    for p, m in zip(model.parameters(), masters):
        master = ours.state[p]["master"]
        # the CPU's fused kernel against torch's default (foreach) path: fp32 rounding apart
        torch.testing.assert_close(master, m.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], reference.state[m]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert torch.equal(p.detach(), master.to(torch.bfloat16)), "the weights are the masters' bf16 rounding"
        assert float(ours.state[p]["step"]) == 4


def test_bf16_weights_alone_would_lose_the_small_updates():
    """Why the masters: an update below bf16's resolution is kept by the master and adds up."""
    model = bf16_model(1)
    start = [p.detach().clone() for p in model.parameters()]
    ours = OffloadedAdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    for _ in range(3):
        set_fresh_gradients(list(model.parameters()))
        ours.step()
    moved = [(ours.state[p]["master"] - s.float()).abs().max().item() for p, s in zip(model.parameters(), start)]
    assert all(m > 0 for m in moved)


def test_resume_through_the_checkpointer_is_exact(tmp_path):
    def make(seed):
        model = bf16_model(seed)
        return model, OffloadedAdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), chunk_size=101)
    straight, straight_opt = make(0)
    for _ in range(2):
        set_fresh_gradients(list(straight.parameters()))
        straight_opt.step()
    Checkpointer(tmp_path).save(2, straight, straight_opt, shared={}, per_rank={})
    resumed, resumed_opt = make(5)   # other weights and fresh state until the load
    Checkpointer(tmp_path).load(tmp_path / "step_00000002", resumed, resumed_opt)
    for p in resumed.parameters():
        assert p.device.type == "cpu" and resumed_opt.state[p]["master"].dtype == torch.float32
    for _ in range(2):
        torch.manual_seed(7)
        set_fresh_gradients(list(straight.parameters()))
        straight_opt.step()
        torch.manual_seed(7)
        set_fresh_gradients(list(resumed.parameters()))
        resumed_opt.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        for key in ("master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(straight_opt.state[a][key], resumed_opt.state[b][key]), key


# qwen3 with biases: the offloaded optimizer over the families' vectors (q/k/v/o biases, q/k norms)
@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.rank=8"],
                                   ["model.family=qwen3", "model.qk_norm=true", "model.attention_bias=true",
                                    "model.attention_output_bias=true"]], ids=["full", "lora", "qwen3-biases"])
def test_train_loop_resumes_exactly(tmp_path, extra):
    common = SMALL + extra + ["optim.offload=true", "train.precision=bf16_pure", "optim.schedule=constant",
                      "optim.warmup_steps=2", "checkpoint.every=2", "checkpoint.export_hf=false",
                      "train.activation_checkpoint=full", "train.checkpoint_group=2"]
    straight = train(compose_config(common + [f"run_dir={tmp_path}/a", "train.steps=8"]))
    train(compose_config(common + [f"run_dir={tmp_path}/b", "train.steps=4"]))
    resumed = train(compose_config(common + [f"run_dir={tmp_path}/b", "train.steps=8"]))
    a, b = losses(straight), losses(resumed)
    assert a == b, (a, b)   # bitwise on a CPU
    if "lora.enabled=true" not in extra:   # (LoRA's adapters learn too slowly for 8 steps to show; see below)
        assert sum(a[s] for s in (6, 7, 8)) / 3 < sum(a[s] for s in (1, 2, 3)) / 3 - 0.3, a


def test_lora_adapters_in_bf16_step_and_the_base_stays():
    """LoRA with optim.offload: the adapters are bf16 on the device like the frozen base, their fp32
    masters on the host; a step moves the adapters and leaves the base bitwise."""
    from longctx.model import Llama, ModelConfig
    from longctx.model.lora import apply_lora
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, attention="sdpa"))
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    bf16_parameters(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OffloadedAdamW(trained, lr=1e-2)
    ids = torch.randint(0, 64, (1, 19))
    for _ in range(2):   # B starts at zero, so A's gradient is zero until B has moved once
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == ("lora_" in name), name


@pytest.mark.parametrize("overrides, message", [
    (["optim.offload=true", "train.precision=bf16_pure", "parallel=fsdp"],
     "optim.offload=true .* with parallel.dp_backend=fsdp use parallel.cpu_offload=true instead"),
    (["optim.offload=true", "train.precision=bf16_pure", "parallel=deepspeed", "parallel.zero_stage=2"],
     "with parallel.dp_backend=deepspeed use parallel.cpu_offload=true"),
    (["optim.offload=true", "train.precision=bf16_autocast"], "set train.precision=bf16_pure"),
    (["train.activation_checkpoint=full", "train.checkpoint_group=3", "model.num_hidden_layers=2"],
     r"train.checkpoint_group=3 is larger than the model's 2 layers: use at most train.checkpoint_group=2"),
    (["train.activation_checkpoint=selective", "train.checkpoint_group=2"], "set train.activation_checkpoint=full"),
    (["train.checkpoint_group=0"], "train.checkpoint_group=0 must be at least 1"),
])
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message) as error:
        validate(cfg, 1)
    assert "\n" not in str(error.value)


def test_two_process_ddp_run_resumes_exactly(tmp_path):
    """Under DDP each rank steps its whole copy on the host from the all-reduced bf16 gradients;
    the DCP checkpoint of that state resumes to the same losses."""
    from test_train import finish, torchrun
    extra = ["optim.offload=true", "train.precision=bf16_pure", "optim.schedule=constant"]
    finish(torchrun(tmp_path / "straight", 4, extra))
    finish(torchrun(tmp_path / "resumed", 2, extra))
    out = finish(torchrun(tmp_path / "resumed", 4, extra))
    assert "resumed from" in out
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_checkpoint_group_is_checked_against_a_pretrained_models_layers(tmp_path):
    """A pretrained folder's config.json sets the layer count, whatever model.num_hidden_layers says."""
    from longctx.model import Llama, ModelConfig, save_hf
    save_hf(Llama(ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)), tmp_path / "hf")
    cfg = compose_config(["train.activation_checkpoint=full", "train.checkpoint_group=3", "model.num_hidden_layers=4",
                          f"model.pretrained={tmp_path / 'hf'}"])
    with pytest.raises(ConfigError, match="larger than the model's 2 layers"):
        validate(cfg, 1)
