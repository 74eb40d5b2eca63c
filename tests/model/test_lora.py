"""LoRA through peft on one process: only the adapters (and lora.trainable) get gradients, under
every checkpointing mode; merged equals unmerged; the exported Hugging Face folder (merged) and
the peft adapter (on the exported base) load in transformers with our logits; bad settings fail
in one line before any work."""
import os

import pytest
import torch

from longctx.model import Llama, ModelConfig, load_hf, save_hf
from longctx.model.lora import apply_lora, is_adapter_key, plain_state, save_adapter
from longctx.parallel.parallelize import apply_activation_checkpointing

RANK, ALPHA = 4, 8.0


# the families' own fields (model/families.py): Qwen2's q/k/v biases, Qwen3's q/k norms and head_dim
FAMILIES = {"llama": {}, "qwen2": dict(family="qwen2", attention_bias=True),
            "qwen3": dict(family="qwen3", qk_norm=True, head_dim=16)}


def lora_model(seed, trainable=("norm",), tie=False, family="llama"):
    """A tiny model of `family` with adapters on every projection; B drawn at random (peft starts it
    at zero, which would leave A without a gradient and the merge without effect)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa",
                         tie_word_embeddings=tie, mlp_chunk_size=5, **FAMILIES[family])
    model = apply_lora(Llama(config), RANK, ALPHA, trainable=trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
            elif name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, 23), generator=g)
    return ids, torch.tensor([0, 9, 23], dtype=torch.int32)


def is_trained(name):
    return is_adapter_key(name) or name.endswith("norm.weight")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["none", "selective", "full", "full+offload"])
def test_only_adapters_and_trainable_modules_get_gradients(mode, family):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    reference = lora_model(seed, family=family)
    model = lora_model(seed, family=family)
    offloader = apply_activation_checkpointing(model, mode.split("+")[0], offload=mode.endswith("offload"))
    if offloader is not None:
        offloader.min_bytes = 0
    ids, cu = batch(seed)
    for m in (reference, model):
        m(ids, cu_seqlens=cu, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    trained = 0
    for name, param in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        if is_trained(name):
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(param.grad, expected[name], msg=f"{mode}: {name} (seed {seed})")
            trained += 1
        else:
            assert not param.requires_grad and param.grad is None, name
    # 7 projections x (A, B) + 2 norms (Qwen3: 4, with q_norm and k_norm) per layer, and the final
    # norm; Qwen2's q/k/v biases stay frozen with the base layers
    assert trained == 2 * (7 * 2 + (4 if family == "qwen3" else 2)) + 1
    from longctx.train.config import Config
    from longctx.train.train import build_optimizer
    optimizer, _ = build_optimizer(model, Config())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_merged_equals_unmerged_and_peft_merge():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    model = lora_model(seed)
    ids, cu = batch(seed)
    state = plain_state(model.state_dict(), ALPHA / RANK)
    merged = Llama(model.config)
    merged.load_state_dict(state)
    with torch.no_grad():
        unmerged_logits = model(ids, cu_seqlens=cu).logits
        torch.testing.assert_close(merged(ids, cu_seqlens=cu).logits, unmerged_logits, msg=f"seed {seed}")
        # peft's own merge of the same adapters gives the same weights
        for module in model.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()
        torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, unmerged_logits)
    peft_merged = plain_state(model.state_dict(), None)
    for key in state:
        torch.testing.assert_close(state[key], peft_merged[key], msg=key)
    assert not torch.equal(state["layers.0.self_attn.q_proj.weight"],
                           plain_state(lora_model(seed).state_dict(), None)["layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("tie, trainable, family", [(False, ("norm",), "llama"),
                                                   (True, ("embed_tokens", "input_layernorm"), "llama"),
                                                   (False, ("norm",), "qwen2"), (True, ("norm",), "qwen3")],
                         ids=["untied-norms", "tied-embeddings", "qwen2-biases", "qwen3-qk-norms-tied"])
def test_exports_load_in_transformers_and_peft(tmp_path, tie, trainable, family):
    import transformers
    from peft import PeftModel
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    model = lora_model(seed, trainable, tie, family)
    if "embed_tokens" in trainable:
        with torch.no_grad():
            model.embed_tokens.weight.add_(0.1 * torch.randn_like(model.embed_tokens.weight))
    ids, cu = batch(seed)
    with torch.no_grad():
        ours = model(ids).logits
    state = model.state_dict()
    save_hf(model, tmp_path / "merged", state=plain_state(state, ALPHA / RANK))
    # the base is the model before training: the trainable modules as they were
    base_state = plain_state(lora_model(seed, trainable, tie, family).state_dict(), None)
    if "embed_tokens" in trainable:
        base_state["embed_tokens.weight"] = base_state["embed_tokens.weight"] + 1.0
    save_hf(model, tmp_path / "base", state=base_state)
    save_adapter(tmp_path / "adapter", state, model.config, RANK, ALPHA, trainable=trainable,
                 base_model=str(tmp_path / "base"))
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(hf_merged).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[family]
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(load_hf(tmp_path / "merged", attention="sdpa")(ids).logits, ours,
                                   atol=1e-5, rtol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, ours, atol=1e-3)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-4,
                                   msg=f"seed {seed}")


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=0"], r"^lora.rank=0 must be at least 1"),
    (["lora.alpha=-1"], r"^lora.alpha=-1.0 must be positive"),
    (["lora.dropout=1.0"], r"^lora.dropout=1.0 must be in \[0, 1\)"),
    (["lora.target_modules=[q_proj,qkv_proj]"],
     r"^lora.target_modules=\['q_proj', 'qkv_proj'\]: \['qkv_proj'\] is not a projection of this model; "
     r"choose among \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]$"),
    (["lora.target_modules=[lm_head]"], r"\['lm_head'\] is not a projection of this model"),
    (["lora.trainable=[rotary]"], r"^lora.trainable: 'rotary' names no module of this model; choose among \["),
])
def test_bad_lora_settings_fail_in_one_line_before_any_work(overrides, message):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from longctx.train.config import REPO_ROOT, ConfigError, register_configs, validate
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["lora.enabled=true", *overrides]))
    with pytest.raises(ConfigError, match=message) as error:
        validate(cfg, 1)
    assert "\n" not in str(error.value)


def test_dropout_under_full_checkpointing_recomputes_the_same_mask():
    """lora.dropout > 0 with full checkpointing: the recomputation must draw the forward's dropout
    masks again (parallelize_llama asks for preserve_rng_state), or the gradients are wrong."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    ids, cu = batch(seed)

    def gradients(mode, preserve):
        torch.manual_seed(seed)
        model = Llama(lora_model(seed).config)
        apply_lora(model, RANK, ALPHA, dropout=0.3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.1)
        apply_activation_checkpointing(model, mode, preserve_rng_state=preserve)
        torch.manual_seed(seed + 1)
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    expected = gradients("none", False)
    torch.testing.assert_close(gradients("full", True), expected, msg=f"seed {seed}")
    assert not torch.allclose(gradients("full", False), expected)
