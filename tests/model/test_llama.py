"""The model against transformers' LlamaForCausalLM: logits, loss, gradients, checkpoints both ways."""
import pytest
import torch
import transformers

from longctx.model import Llama, ModelConfig, load_hf, save_hf
from longctx.model.hf import hf_key

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_config(tied=False, heads=4, kv_heads=2, rope_scaling=None, head_dim=None):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or 48 // heads,
        max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=5000.0, rope_scaling=rope_scaling)
    config._attn_implementation = "eager"
    return config


def hf_model(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(**kwargs)).float()
    with torch.no_grad():  # norms start at 1: perturb them so that a mix-up of norms shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model


CASES = {
    "gqa-untied": dict(),
    "gqa-tied": dict(tied=True),
    "mha-llama3rope": dict(heads=4, kv_heads=4, rope_scaling=LLAMA3_ROPE),
    "mqa-linearrope-hd16": dict(heads=4, kv_heads=1, head_dim=16,
                                rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_gradients_match_transformers(tmp_path, case):
    ref = hf_model(tmp_path, **CASES[case])
    ours = load_hf(tmp_path / "hf", attention="sdpa")
    ids = torch.randint(0, 97, (2, 40))
    labels = ids.clone()
    labels[:, :7] = -100
    ref_out = ref(input_ids=ids, labels=labels)
    out_logits = ours(ids).logits
    torch.testing.assert_close(out_logits, ref_out.logits, atol=1e-4, rtol=0)
    out = ours(ids, labels=labels)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=0)
    ref_out.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[hf_key(name)], atol=1e-5, rtol=1e-4, msg=name)


def test_export_reloads_in_transformers_with_identical_logits(tmp_path):
    hf_model(tmp_path, rope_scaling=LLAMA3_ROPE, tied=True)
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "export")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").float()
    assert again.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, 97, (1, 33))
    torch.testing.assert_close(again(input_ids=ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_packed_documents_equal_documents_alone():
    torch.manual_seed(1)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, attention="sdpa"))
    lengths = [5, 1, 12, 6]
    docs = [torch.randint(0, 50, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 5, 6, 18, 24], dtype=torch.int32)
    logits = model(packed, cu_seqlens=cu_seqlens).logits
    alone = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)


def test_output_is_a_pytree_of_its_tensors():
    """Wrappers find the loss and logits by flattening the output (FSDP2 before torch 2.14 hooked
    its pre-backward all-gather only onto what `tree_flatten` yields)."""
    from torch.utils._pytree import tree_flatten, tree_map
    torch.manual_seed(2)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, attention="sdpa"))
    ids = torch.randint(0, 50, (1, 9))
    with_loss, with_logits = model(ids, labels=ids), model(ids)
    assert [t is with_loss.loss for t in tree_flatten(with_loss)[0]] == [True]
    assert [t is with_logits.logits for t in tree_flatten(with_logits)[0]] == [True]
    doubled = tree_map(lambda t: 2 * t, with_loss)
    assert type(doubled) is type(with_loss) and torch.equal(doubled.loss, 2 * with_loss.loss)


def test_a_forward_over_host_bounded_cu_seqlens_reads_nothing_back(monkeypatch):
    """The trainer moves cu_seqlens with with_host_bounds, so that the forward does not read it
    back from the GPU (a host sync mid-step): the same logits, and no tensor read to a list."""
    from longctx.model.attention import with_host_bounds
    # the flash kernel: on a GPU where there is one, else in Triton's interpreter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(2)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, attention="flash")).to(device)
    packed = torch.randint(0, 50, (1, 24), device=device)
    cu_seqlens = torch.tensor([0, 5, 6, 18, 24], dtype=torch.int32, device=device)
    read = model(packed, cu_seqlens=cu_seqlens).logits
    bounded = with_host_bounds(cu_seqlens.cpu(), device)

    def no_read_back(self):
        raise AssertionError("a tensor was read back although cu_seqlens carried its bounds")
    monkeypatch.setattr(torch.Tensor, "tolist", no_read_back)
    given = model(packed, cu_seqlens=bounded).logits
    assert torch.equal(read, given)


def test_bounds_moved_with_their_host_copy_are_not_read_back():
    from longctx.model.attention import document_bounds, document_ranges, with_host_bounds
    from longctx.model.llama import longest_document
    cu_seqlens = torch.tensor([0, 5, 6, 18, 24], dtype=torch.int32)
    # a meta tensor holds no values: reading it back would fail
    on_meta = with_host_bounds(cu_seqlens, torch.device("meta"))
    assert on_meta.device.type == "meta"
    assert document_bounds(on_meta) == [0, 5, 6, 18, 24] and longest_document(on_meta) == 12
    assert document_ranges(on_meta, 24) == [(0, 5), (5, 6), (6, 18), (18, 24)]
    # a tensor changed in place after it was moved is read again
    same = with_host_bounds(cu_seqlens, torch.device("cpu"))
    same[1] = 3
    assert document_bounds(same) == [0, 3, 6, 18, 24]


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="int32"):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="unknown attention backend 'nope': choose one of auto, "):
        Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, attention="nope"))(
            torch.zeros(1, 4, dtype=torch.long))
    # a checkpoint that lacks a tensor names the key
    hf_model(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("mixer", ["flash"])
def test_registered_mixers_match_sdpa_in_the_model(mixer):
    """Logits and gradients with a packed batch are the same whichever mixer the model uses."""
    torch.manual_seed(2)
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa")
    model = Llama(config)
    ids = torch.randint(0, 50, (1, 21))
    cu_seqlens = torch.tensor([0, 4, 5, 21], dtype=torch.int32)
    results = []
    for name in ("sdpa", mixer):
        model.zero_grad()
        config.attention = name
        out = model(ids, cu_seqlens=cu_seqlens, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_blockwise_mlp_gives_the_same_loss_and_gradients():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention="sdpa")
    whole = Llama(config)
    chunked = Llama(ModelConfig(**{**config.__dict__, "mlp_chunk_size": 7}))
    chunked.load_state_dict(whole.state_dict())
    ids = torch.randint(0, 50, (2, 30))
    losses = []
    for model in (whole, chunked):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for a, b in zip(chunked.parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_mixer_gets_one_dtype_under_autocast():
    """q and k must stay in autocast's bf16 like v, or a kernel that requires one dtype (flash)
    refuses them."""
    from longctx.model.attention import register_attention, sdpa_attention
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa_attention(q, k, v, **kwargs)
    register_attention("dtype_spy", spy)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, attention="dtype_spy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 50, (1, 8)), labels=torch.randint(0, 50, (1, 8))).loss.backward()
    assert seen == [(torch.bfloat16,) * 3]


@pytest.mark.parametrize("layer_types", [None, ["linear", "softmax"]], ids=["softmax", "hybrid"])
def test_residual_stream_is_bf16_under_autocast_and_loss_close_to_fp32(layer_types):
    """With fp32 weights under bf16 autocast, the layers' inputs (what full checkpointing keeps)
    and the final hidden states are bf16, as in a bf16 model: fp32 weights of the norms must not
    promote them; the loss stays within bf16 error of the fp32 model's."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types))
    dtypes = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype))
    model.norm.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    ids = torch.randint(0, 50, (2, 16))
    reference = model(ids, labels=ids).loss
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    assert dtypes == [torch.bfloat16] * 3
    assert abs(loss.item() - reference.item()) < 2e-2 * reference.item()


@pytest.mark.parametrize("layer_types", [None, ["linear", "softmax"]], ids=["softmax", "hybrid"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parameter_count_matches_the_model(layer_types, tied):
    """num_parameters feeds MFU and the memory planner: it must count what the model holds."""
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types,
                         tie_word_embeddings=tied)
    assert config.num_parameters() == sum(p.numel() for p in Llama(config).parameters())
