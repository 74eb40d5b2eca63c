"""data.long_examples on the shipped sample: rows of exactly seq_len, the loss on the answers only,
each answer really in the context at its recorded depth (multi-hop chains followed through the
decoded text), determinism by seed, new examples each epoch, exact resume, and no evaluation format."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from longctx.data import DataConfig, DataError, build_loader, prepare
from longctx.data.long_examples import LongExamplesConfig, example_count, first_sentence
from longctx.data.sharegpt import resolve_path

SEQ_LEN = 4096


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("long_cache"))
    prepare(DataConfig(cache_dir=folder, verbose=False))
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_path("data/tokenizer")))


def config(cache_dir, **long) -> DataConfig:
    options = dict(ratio=0.5, min_tokens=1024, max_tokens=SEQ_LEN) | long
    return DataConfig(cache_dir=cache_dir, verbose=False, long_examples=LongExamplesConfig(**options))


def epoch_rows(loader, epoch=0):
    return [loader.row(epoch, r) for r in range(len(loader._sequences(epoch)))]


def test_rows_are_seq_len_and_the_ratio_holds(cache_dir):
    loader = build_loader(config(cache_dir), seq_len=SEQ_LEN)
    rows = epoch_rows(loader)
    long_rows = [r for r in rows if r["long_example"] is not None]
    assert all(len(r["input_ids"]) == SEQ_LEN and r["doc_lengths"].sum() == SEQ_LEN for r in rows)
    assert abs(len(long_rows) / len(rows) - 0.5) < 0.1
    for row in long_rows:
        example = row["long_example"]
        assert 1024 <= len(example.tokens) <= SEQ_LEN
        assert row["doc_lengths"][0] == len(example.tokens)     # the example is one attention span
        assert (row["input_ids"][:len(example.tokens)] == example.tokens).all()
        assert (row["position_ids"][:len(example.tokens)] == np.arange(len(example.tokens))).all()
    # the lengths are drawn from the whole range, not pinned to one value
    lengths = [len(r["long_example"].tokens) for r in long_rows]
    assert max(lengths) - min(lengths) > 1000


def test_ratio_one_makes_every_row_long(cache_dir):
    loader = build_loader(config(cache_dir, ratio=1.0, min_tokens=SEQ_LEN), seq_len=SEQ_LEN)
    rows = epoch_rows(loader)
    assert rows and all(r["long_example"] is not None and len(r["long_example"].tokens) == SEQ_LEN for r in rows)


def test_loss_only_on_the_answers(cache_dir, tokenizer):
    loader = build_loader(config(cache_dir), seq_len=SEQ_LEN)
    seen = 0
    for row in epoch_rows(loader):
        example = row["long_example"]
        if example is None:
            continue
        seen += 1
        labels = row["labels"][:len(example.tokens)]
        trained = labels != -100
        assert (labels[trained] == example.tokens[trained]).all()
        assert not trained[:example.context_tokens].any()
        # independent reference: each answer, then the Llama-3 end-of-turn, and nothing else
        text = tokenizer.decode(example.tokens[trained].tolist())
        assert text == "".join(a["answer"] + "<|eot_id|>" for a in example.answers)
    assert seen


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_of_the_tokenizer_closes_the_example(tmp_path, tokenizer):
    """SmolLM2's kind of template (ChatML with a default system prompt): the questions are user
    turns, the answers assistant turns, and only the answers (and their end of turn) are trained."""
    import json
    import shutil
    folder = tmp_path / "chatml_tokenizer"
    shutil.copytree(resolve_path("data/tokenizer"), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(settings | {"chat_template": CHATML}))
    cfg = dataclasses.replace(config(str(tmp_path / "cache")), tokenizer=str(folder))
    maker = build_loader(cfg, seq_len=SEQ_LEN).long_examples
    assert maker.chat_template == "tokenizer"
    for index in range(6):
        example = maker.make(0, index, 3000)
        tail = tokenizer.decode(example.tokens[example.context_tokens:].tolist())
        assert tail.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n")
        trained = tokenizer.decode(example.tokens[example.loss_mask != 0].tolist())
        assert trained == "".join(a["answer"] + "<|im_end|>\n" for a in example.answers)


def follow_chain(context: str, start: str) -> str:
    links = dict(re.findall(r"Note: key (\S+) points to key (\S+)\.", context))
    values = dict(re.findall(r"Note: the value stored under key (\S+) is (\S+)\.", context))
    key, hops = start, 0
    while key in links:
        key, hops = links[key], hops + 1
    assert hops >= 1, "a multi-hop question must need at least one link"
    return values[key]


def test_answers_are_in_the_context_at_their_depth(cache_dir, tokenizer):
    loader = build_loader(config(cache_dir, questions=3), seq_len=SEQ_LEN)
    maker = loader.long_examples
    depths, tasks = [], set()
    for index in range(24):
        example = maker.make(5, index, 4000)
        assert len(example.tokens) == 4000
        tasks.add(example.task)
        context = tokenizer.decode(example.tokens[:example.context_tokens].tolist())
        for answer in example.answers:
            item = tokenizer.decode(example.tokens[answer["at"]:answer["end"]].tolist())
            assert answer["end"] <= example.context_tokens
            assert answer["depth"] == pytest.approx(answer["at"] / example.context_tokens)
            depths.append(answer["depth"])
            if example.task == "recall_turn":
                conversation_id = re.search(r"conversation (\S+?)[.? ]", answer["question"]).group(1)
                assert item.startswith(f"\n### Conversation {conversation_id}\n")
                assert answer["answer"] in item and context.count(f"Conversation {conversation_id}\n") == 1
            elif example.task == "kv_lookup":
                key = re.search(r"key (\S+?)[ ?.]", answer["question"]).group(1)
                assert item == f"\nNote: the value stored under key {key} is {answer['answer']}.\n"
                assert context.count(f"under key {key} ") == 1
            else:
                start = re.search(r"key (\S+) ", answer["question"], re.IGNORECASE).group(1)
                assert follow_chain(context, start) == answer["answer"]
                assert answer["answer"] in item
    assert tasks == {"recall_turn", "kv_lookup", "multi_hop"}
    # spread through the context: every fifth of it holds answers
    assert set(np.floor(np.array(depths) * 5).astype(int).tolist()) == {0, 1, 2, 3, 4}


def test_no_evaluation_format_in_training(cache_dir, tokenizer):
    maker = build_loader(config(cache_dir), seq_len=SEQ_LEN).long_examples
    for index in range(12):
        text = tokenizer.decode(maker.make(0, index, SEQ_LEN).tokens.tolist()).lower()
        for phrase in ("pass key", "passkey", "register_content", "magic number", "line "):
            assert phrase not in text or phrase == "line " and not re.search(r"\bline \w+-\w+-\w+:", text)


def batches(loader, count):
    return [next(loader) for _ in range(count)]


def test_deterministic_by_seed_new_each_epoch_and_resumable(cache_dir):
    cfg = config(cache_dir)
    first, again = build_loader(cfg, seq_len=SEQ_LEN, seed=3), build_loader(cfg, seq_len=SEQ_LEN, seed=3)
    steps = first.steps_per_epoch + 3     # into the second epoch
    one, two = batches(first, steps), batches(again, steps)
    for a, b in zip(one, two):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = batches(build_loader(cfg, seq_len=SEQ_LEN, seed=4), 4)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, other))
    # epoch 1 makes other examples than epoch 0 (other lengths, conversations and keys)
    loader = build_loader(cfg, seq_len=SEQ_LEN, seed=3)
    examples = [[r["long_example"] for r in epoch_rows(loader, e) if r["long_example"] is not None] for e in (0, 1)]
    assert {len(x.tokens) for x in examples[0]} != {len(x.tokens) for x in examples[1]}
    # resume mid-epoch: the next batches are the uninterrupted run's
    resumed = build_loader(cfg, seq_len=SEQ_LEN, seed=3)
    partway = build_loader(cfg, seq_len=SEQ_LEN, seed=3)
    batches(partway, 5)
    assert resumed.load_state_dict(partway.state_dict())
    for a, b in zip(batches(resumed, 4), one[5:9]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # other long-example options cannot resume exactly
    changed = build_loader(config(cache_dir, ratio=0.25), seq_len=SEQ_LEN, seed=3)
    with pytest.raises(DataError, match="layout"):
        changed.load_state_dict(partway.state_dict())


def test_row_span_rows_have_no_internal_boundaries(cache_dir):
    cfg = dataclasses.replace(config(cache_dir), attention_span="row")
    loader = build_loader(cfg, seq_len=SEQ_LEN, micro_batch=2)
    for _ in range(3):
        batch = next(loader)
        cu = batch["cu_seqlens"].tolist()
        for r in range(2):
            row_cu = [c - r * SEQ_LEN for c in cu if r * SEQ_LEN <= c <= (r + 1) * SEQ_LEN]
            used = int((batch["position_ids"][r] == torch.arange(SEQ_LEN)).sum())
            assert row_cu[:2] == [0, used]                   # the data: one span
            assert (batch["position_ids"][r, :used] == torch.arange(used)).all()
            # what follows is padding only: pad documents of their own, no labels
            assert (batch["labels"][r, used:] == -100).all()


def test_bad_options_fail_in_one_line(cache_dir):
    with pytest.raises(ValueError, match=r"ratio=1.5 must be in \[0, 1\]"):
        config(cache_dir, ratio=1.5).validate()
    with pytest.raises(ValueError, match="tasks=.*choose a non-empty list"):
        config(cache_dir, tasks=["passkey"]).validate()
    with pytest.raises(DataError, match=r"max_tokens=8192 is longer than train.seq_len=4096"):
        build_loader(config(cache_dir, max_tokens=8192), seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="set data.format=sharegpt"):
        dataclasses.replace(config(cache_dir), format="text").validate()


def test_first_sentence_and_count():
    assert first_sentence([{"role": "user", "content": "How do I sort a list? In Python."}]) == "How do I sort a list?"
    assert first_sentence([{"role": "user", "content": "continue"}]) is None
    # half the rows long: n long rows of mean length m take n * (seq_len - m) ordinary tokens
    n = example_count(0.5, 100_000, 1000, 600)
    assert n == round(0.5 * 100_000 / (1000 - 300))
    assert example_count(0.0, 100_000, 1000, 600) == 0 and example_count(1.0, 100_000, 1000, 600) == 100
