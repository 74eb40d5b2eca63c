"""Each supported family against transformers' own model of that family (Llama, Mistral, Qwen2, Qwen3):
logits and every gradient in float64 from a checkpoint with random weights, packed documents against
transformers run on each document alone, the export reloaded as its family, and the refusals."""
import json

import pytest
import torch
import transformers

from longctx.model import Llama, ModelConfig, load_hf, save_hf
from longctx.model.families import FAMILIES
from longctx.model.hf import hf_key

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-6)
# family -> (transformers classes, that family's own settings); GQA throughout (fewer KV heads than the
# 4 Ulysses ranks of the parallel tests), head_dim != hidden / heads where the family has the field
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "llama-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False, sliding_window=128)),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    "qwen3-tied-mqa": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)),
}


def hf_checkpoint(folder, case, seed=0):
    """A transformers model of the case's family with random weights (norms and biases perturbed, so
    that a mix-up of them shows), saved to `folder`; returned in float64."""
    config_class, model_class, settings = CASES[case]
    config = config_class(**{**COMMON, **settings})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model.double()


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_transformers_in_float64(tmp_path, case):
    ref = hf_checkpoint(tmp_path / "hf", case)
    ours = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64)
    assert ours.config.family == case.split("-")[0]
    names = {hf_key(n) for n, _ in ours.named_parameters()}
    assert names == {n for n, _ in ref.named_parameters()}        # every bias and q/k norm, none more
    ids = torch.randint(0, VOCAB, (2, 37))
    labels = ids.clone()
    labels[:, :5] = -100
    ref_out = ref(input_ids=ids, labels=labels)
    # transformers' RMSNorm computes in float32 whatever the input dtype: its round-off (~1e-8) bounds
    # the agreement; a missing bias or norm differs by ~1e-2
    torch.testing.assert_close(ours(ids).logits, ref_out.logits, atol=1e-6, rtol=1e-6)
    out = ours(ids, labels=labels)
    torch.testing.assert_close(out.loss.double(), ref_out.loss.double(), atol=1e-6, rtol=1e-6)
    ref_out.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[hf_key(name)], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mixer", ["sdpa", "flash"])
def test_packed_documents_equal_transformers_on_each_document(tmp_path, case, mixer):
    """cu_seqlens over a packed row against transformers' model run per document (positions restart);
    the flash kernel runs under Triton's interpreter on a CPU (float32, its dtypes)."""
    ref = hf_checkpoint(tmp_path / "hf", case)
    dtype = torch.float64 if mixer == "sdpa" else torch.float32
    ours = load_hf(tmp_path / "hf", attention=mixer, dtype=dtype)
    ref = ref.to(dtype)
    lengths = [7, 1, 13, 5]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    cu_seqlens = torch.tensor([0, 7, 8, 21, 26], dtype=torch.int32)
    packed = ours(torch.cat(docs, dim=1), cu_seqlens=cu_seqlens).logits
    alone = torch.cat([ref(input_ids=d).logits for d in docs], dim=1)
    tolerance = 1e-6 if dtype == torch.float64 else 2e-5   # transformers' norms are float32 (see above)
    torch.testing.assert_close(packed, alone, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_as_its_family_in_transformers_and_in_longctx(tmp_path, case):
    hf_checkpoint(tmp_path / "hf", case)
    ours = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64)
    save_hf(ours, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    family = FAMILIES[ours.config.family]
    assert config["model_type"] == family.name and config["architectures"] == [family.architecture]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert type(again).__name__ == family.architecture
    reloaded = load_hf(tmp_path / "export", attention="sdpa", dtype=torch.float64)
    assert reloaded.config == ours.config
    ids = torch.randint(0, VOCAB, (1, 29))
    expected = ours(ids).logits
    torch.testing.assert_close(again.double()(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)


def test_a_config_built_here_exports_as_the_family_it_names(tmp_path):
    """A Qwen3 shape initialised by longctx (no checkpoint) writes a Qwen3Config; transformers agrees."""
    torch.manual_seed(0)
    config = ModelConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24, family="qwen3",
                         qk_norm=True, attention="sdpa")
    model = Llama(config)
    save_hf(model, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert isinstance(hf, transformers.Qwen3ForCausalLM)
    ids = torch.randint(0, VOCAB, (1, 17))
    torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(qk_norm=True), "model.family=llama cannot be exported .* llama has no q/k norm; set model.family=qwen3"),
    (dict(family="qwen2"), "qwen2 checkpoints have attention_bias=True, not model.attention_bias=False"),
    (dict(family="qwen2", attention_bias=True, head_dim=16),
     "head_dim = hidden_size / num_attention_heads \\(12\\), not model.head_dim=16; no supported family has"),
    (dict(family="qwen2", attention_bias=True, attention_output_bias=True),
     "qwen2 checkpoints have attention_output_bias=False, not model.attention_output_bias=True; set model.family=llama"),
    (dict(family="mistral", attention_bias=True), "mistral has no attention biases; set model.family=qwen2"),
    (dict(family="qwen3"), "qwen3 checkpoints have qk_norm=True, not model.qk_norm=False; set model.family=llama"),
])
def test_what_a_family_cannot_state_is_a_one_line_error(fields, message):
    config = ModelConfig(**{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 2, **fields})
    with pytest.raises(ValueError, match=message) as error:
        config.to_hf()
    assert "\n" not in str(error.value)


def test_a_sliding_window_in_effect_is_refused_and_one_out_of_effect_loads(tmp_path):
    # Mistral v0.1: a 4096 window within 32K positions (here 64 within 256)
    window = {**COMMON, "num_attention_heads": 4, "num_key_value_heads": 2}
    transformers.MistralConfig(**window, sliding_window=64).save_pretrained(tmp_path / "mistral")
    transformers.Qwen2Config(**window, use_sliding_window=True, sliding_window=64,
                             max_window_layers=1).save_pretrained(tmp_path / "qwen2")
    from longctx.model.hf import load_hf_config
    for name in ("mistral", "qwen2"):
        with pytest.raises(ValueError, match=f"this {name} checkpoint attends within a sliding window of 64 tokens "
                                             "\\(max_position_embeddings 256\\): longctx trains full causal attention"):
            load_hf_config(tmp_path / name)
    with pytest.raises(ValueError, match="model.sliding_window=64 .*set model.sliding_window=null"):
        ModelConfig(sliding_window=64)
    # as long as the context, switched off, or on no layer (max_window_layers = all): full attention
    transformers.MistralConfig(**window, sliding_window=256).save_pretrained(tmp_path / "long")
    transformers.Qwen2Config(**window, use_sliding_window=False, sliding_window=64).save_pretrained(tmp_path / "off")
    transformers.Qwen2Config(**window, use_sliding_window=True, sliding_window=64,
                             max_window_layers=2).save_pretrained(tmp_path / "none")
    for name in ("long", "off", "none"):
        assert load_hf_config(tmp_path / name).sliding_window is None


def test_an_unsupported_model_type_names_the_supported_ones(tmp_path):
    transformers.GemmaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=12).save_pretrained(tmp_path / "gemma")
    with pytest.raises(ValueError, match="model_type 'gemma' is not supported; longctx loads llama, mistral, "
                                         "qwen2, qwen3 checkpoints"):
        load_hf(tmp_path / "gemma")


def test_parameter_count_is_the_models():
    for case in ("llama-bias", "qwen2", "qwen3", "qwen2-tied"):
        config_class, _, settings = CASES[case]
        config = ModelConfig.from_hf(config_class(**{**COMMON, **settings}))
        with torch.device("meta"):
            model = Llama(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters()), case


def test_qk_norm_of_a_share_of_the_heads_is_that_share_of_the_norm():
    """Ulysses hands each rank a share of the heads after `project` has normalised them: a rank
    normalising its share itself (after the all-to-all) gets the same values, the norm's weight being
    one per head dim, shared by all heads (the 4-process step of tests/parallel/test_families_sp.py
    runs the whole path)."""
    from longctx.model.llama import Attention
    torch.manual_seed(0)
    config = ModelConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24, family="qwen3",
                         qk_norm=True)
    layer = Attention(config).double()
    with torch.no_grad():
        layer.q_norm.weight.add_(0.1 * torch.randn(24, dtype=torch.float64))
        x = torch.randn(2, 9, 48, dtype=torch.float64)
        q, k, _ = layer.heads(x)
        raw_q = layer.q_proj(x).view(2, 9, 4, 24)
        for share in (slice(0, 2), slice(2, 4)):   # two Ulysses ranks' heads
            torch.testing.assert_close(layer.q_norm(raw_q[:, :, share].contiguous()), q[:, :, share], rtol=0, atol=0)
        # and it is transformers' Qwen3 q_norm: RMSNorm over each head's vector
        expected = raw_q * torch.rsqrt(raw_q.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.q_norm.weight
        torch.testing.assert_close(q, expected)


def test_qk_norm_then_rotary_on_the_kernel_paths():
    """On a GPU, q_norm's output (a view the RMSNorm kernel returns) is rotated in place by Liger's
    kernel: values and gradients as on the PyTorch paths (the kernels under Triton's interpreter here)."""
    from longctx.model.rotary import rotary_cos_sin
    from longctx.ops.rms_norm import rms_norm
    from longctx.ops.rotary import apply_rotary
    torch.manual_seed(0)
    batch, seqlen, heads, kv_heads, d = 1, 12, 4, 2, 16
    q_proj, k_proj = torch.nn.Linear(32, heads * d), torch.nn.Linear(32, kv_heads * d)
    q_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
    k_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
    x = torch.randn(batch, seqlen, 32)
    cos, sin = rotary_cos_sin(1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d)), torch.arange(seqlen)[None],
                              torch.float32)
    results = []
    for kernel in (False, True):
        for p in (q_proj.weight, q_weight, k_weight):
            p.grad = None
        q = rms_norm(q_proj(x).view(batch, seqlen, heads, d), q_weight, 1e-6, kernel=kernel)
        k = rms_norm(k_proj(x).view(batch, seqlen, kv_heads, d), k_weight, 1e-6, kernel=kernel)
        q, k = apply_rotary(q, k, cos, sin, kernel=kernel)
        (q.square().sum() + (1.5 * k).sum()).backward()
        results.append([q.detach(), k.detach(), q_proj.weight.grad.clone(), q_weight.grad.clone(), k_weight.grad.clone()])
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
