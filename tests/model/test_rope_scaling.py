"""Rope scaling against transformers at 4x the original context (float64): linear, llama3, YaRN (its
attention factor, beta_fast/beta_slow, truncate) and dynamic NTK; rope overrides on a pretrained
checkpoint; the export carries them; decoding with dynamic NTK follows transformers' generate."""
import json

import pytest
import torch
import transformers

from longctx.model import ModelConfig, load_hf, save_hf
from longctx.model.rotary import rope_attention_factor, rope_inv_freq

ORIGINAL = 64          # the checkpoint's context; the tests run at 4x it
LENGTH = 4 * ORIGINAL
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-betas-notruncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                              "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                              "attention_factor": 1.3},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                    "mscale": 0.9, "mscale_all_dim": 0.6},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def hf_config(rope_scaling=None, max_position_embeddings=ORIGINAL, theta=10000.0):
    rope = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, rope_parameters=rope)
    config._attn_implementation = "eager"
    return config


def hf_model(config, folder=None):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():   # large weights: positions matter to the logits, so a wrong angle shows
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    if folder is not None:
        model.save_pretrained(folder)
    return model


# transformers' RMSNorm computes in float32 even in a float64 model: its logits differ from
# longctx's float64 ones by ~1e-6 without any scaling; a wrong angle moves them by > 1e-3
TOL = dict(atol=1e-5, rtol=1e-5)


def ids():
    return torch.randint(0, 101, (2, LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", SCALINGS)
def test_logits_match_transformers_at_4x_the_original_length(tmp_path, name):
    scaling = SCALINGS[name]
    max_positions = ORIGINAL if scaling["rope_type"] == "dynamic" else LENGTH
    ref = hf_model(hf_config(scaling, max_positions), tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64)
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    x = ids()
    with torch.no_grad():
        expected = ref(input_ids=x).logits
        got = ours(x).logits
    torch.testing.assert_close(got, expected, **TOL)
    # the scaling changes the logits beyond the original context: the test would see it missing
    plain = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64, rope_scaling=None)
    with torch.no_grad():
        assert (plain(x).logits - expected)[:, ORIGINAL:].abs().max() > 1e-3

    # the export carries the scaling: transformers reads back the same model
    save_hf(ours, tmp_path / "export")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, expected, **TOL)


def test_yarn_frequencies_and_attention_factor_are_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name, scaling in SCALINGS.items():
        if scaling["rope_type"] == "default":
            continue
        config = hf_config(scaling, ORIGINAL if scaling["rope_type"] == "dynamic" else LENGTH)
        ours = ModelConfig.from_hf(config)
        seq_len = LENGTH if scaling["rope_type"] == "dynamic" else None
        inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
        assert torch.equal(rope_inv_freq(ours, seq_len), inv_freq), name
        if scaling["rope_type"] == "yarn":
            assert rope_attention_factor(ours) == factor, name
    assert rope_attention_factor(ModelConfig.from_hf(hf_config(SCALINGS["yarn"], LENGTH))) == pytest.approx(
        0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_overrides_on_a_pretrained_checkpoint(tmp_path):
    """rope_theta, rope_scaling and max_position_embeddings set over a checkpoint without scaling:
    the model is the one transformers builds from the edited config.json, and the export says so."""
    hf_model(hf_config(), tmp_path / "hf")
    overrides = {"rope_theta": 20000.0, "max_position_embeddings": LENGTH,
                 "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    ours = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64, **overrides)
    # the original length is the checkpoint's own, not the overridden max_position_embeddings
    assert ours.config.rope_scaling["original_max_position_embeddings"] == ORIGINAL
    edited = json.loads((tmp_path / "hf" / "config.json").read_text())
    edited.update(max_position_embeddings=LENGTH, rope_parameters={
        "rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(edited))
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    x = ids()
    with torch.no_grad():
        expected = ref(input_ids=x).logits
        torch.testing.assert_close(ours(x).logits, expected, **TOL)
    save_hf(ours, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["max_position_embeddings"] == LENGTH
    assert exported["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                                           "original_max_position_embeddings": ORIGINAL}


def test_dynamic_decoding_follows_transformers_generate(tmp_path):
    """Greedy decoding past the original length with dynamic NTK: the frequencies grow with each
    token (the cached keys keep the prefill's), as in transformers' generate."""
    from longctx.eval.decode import greedy_generate
    ref = hf_model(hf_config(SCALINGS["dynamic"]), tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", attention="sdpa", dtype=torch.float64)
    prompt = ids()[:1, :ORIGINAL + 30]
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, prompt.shape[1]:]
    assert torch.equal(greedy_generate(ours, prompt, 8), expected)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": 4.0, "beta": 3}, "unknown keys \\['beta'\\]"),
    ({"rope_type": "yarn"}, "needs \\['factor'\\]"),
    ({"rope_type": "dynamic", "factor": 0.5}, "factor=0.5 must be >= 1"),
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
])
def test_bad_scaling_is_one_clear_error(scaling, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(rope_scaling=scaling)
