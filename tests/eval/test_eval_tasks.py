"""The retrieval generators (the answer once, where asked, from a seed) and the scoring."""
import random
import re
from pathlib import Path

import pytest

from longctx.eval.scoring import accuracy_by, accuracy_grid, first_number, score_answer
from longctx.eval.tasks import (Haystack, fit_line_retrieval, haystack_text, make_line_retrieval, make_needle,
                                sentence_boundary)

REPO = Path(__file__).resolve().parents[2]


def occurrences(number: str, text: str) -> int:
    """Whole-number occurrences (not inside a longer number)."""
    return len(re.findall(rf"(?<!\d){number}(?!\d)", text))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(REPO / "data" / "tokenizer"))


@pytest.fixture(scope="module")
def haystack(tokenizer):
    from longctx.data import read_sharegpt
    conversations, _ = read_sharegpt(REPO / "data" / "sharegpt_sample.json")
    return Haystack(tokenizer, haystack_text(conversations[:60]))


def test_line_retrieval_answer_once_in_the_asked_line():
    rng = random.Random()
    for _ in range(40):
        lines, depth, seed = rng.randint(1, 300), rng.choice([0.0, 1.0, rng.random()]), rng.randrange(10 ** 6)
        sample = make_line_retrieval(lines, depth, seed)
        body = sample.prompt.split("\n\n", 1)[1]
        records = [l for l in body.split("\n") if l.startswith("line ")]
        assert len(records) == lines
        target = round(depth * (lines - 1))
        assert sample.meta["line"] == target and sample.depth == pytest.approx(target / max(lines - 1, 1))
        # exactly once in the whole prompt, in the asked line, whose name the question names
        assert sample.prompt.count(sample.answer) == 1 and occurrences(sample.answer, sample.prompt) == 1
        assert records[target].endswith(f"<{sample.answer}>")
        name = records[target].split()[1].rstrip(":")
        assert f"in line {name}?" in sample.prompt and sample.prompt.count(f"line {name}:") == 1
        assert len({r.split()[1] for r in records}) == lines   # distinct names


def test_line_retrieval_reproducible_from_seed():
    a = make_line_retrieval(50, 0.3, seed=7)
    assert make_line_retrieval(50, 0.3, seed=7) == a
    others = [make_line_retrieval(50, 0.3, seed=s) for s in range(8, 12)]
    assert all(o.prompt != a.prompt for o in others)


def test_line_retrieval_custom_vocabulary_and_errors():
    names = [f"n{i}" for i in range(6)]
    sample = make_line_retrieval(6, 0.5, 3, names=names, digits=1, header="", line_template="{name} {value} ",
                                 question="query {name}")
    words = sample.prompt.split()
    assert sorted(words[:-2:2]) == names and sample.prompt.count(sample.answer) == 1
    assert words[words.index(sample.meta["name"]) + 1] == sample.answer
    with pytest.raises(ValueError, match="depth must lie in"):
        make_line_retrieval(5, 1.5, 0)
    with pytest.raises(ValueError, match="distinct names"):
        make_line_retrieval(7, 0.5, 0, names=names)
    with pytest.raises(ValueError, match="use more digits"):
        make_line_retrieval(10, 0.5, 0, digits=1)


def test_fit_line_retrieval_fills_the_length(tokenizer):
    for length in (200, 1000, 3000):
        sample = fit_line_retrieval(tokenizer, length, 0.5, seed=length)
        tokens = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
        assert tokens == sample.meta["tokens"] <= length
        bigger = make_line_retrieval(sample.meta["num_lines"] + 1, 0.5, seed=length)
        assert len(tokenizer.encode(bigger.prompt, add_special_tokens=False)) > length   # one more line won't fit
        assert tokens > length - 50                    # within about three lines
    with pytest.raises(ValueError, match="already has"):
        fit_line_retrieval(tokenizer, 20, 0.5, 0)


def test_sentence_boundary():
    text = "One two. Three four! Five\nsix seven"
    assert sentence_boundary(text, 3) == 0
    assert sentence_boundary(text, text.index("Three") + 2) == text.index("Three")
    assert sentence_boundary(text, text.index("Three")) == text.index("Three")
    assert sentence_boundary(text, len(text) - 1) == text.index("six")


def test_needle_once_at_the_asked_depth(haystack, tokenizer):
    rng = random.Random()
    for length in (300, 1200, 4000):
        for depth in (0.0, rng.random(), 1.0):
            sample = make_needle(haystack, length, depth, seed=rng.randrange(10 ** 6))
            key, at = sample.meta["key"], sample.meta["needle_at"]
            needle = f" The special magic number for {key} is {sample.answer}. "
            assert sample.prompt.count(sample.answer) == 1 and sample.prompt.count(needle) == 1
            assert sample.prompt[at:at + len(needle)] == needle
            context = sample.prompt[:at] + sample.prompt[at + len(needle):sample.prompt.index("\n\nWhat is")]
            asked = int(depth * len(context))
            # at the start of the sentence holding the asked depth: no sentence ends in between
            assert at <= asked or depth == 1.0
            assert sentence_boundary(context, asked) == at or (depth == 1.0 and at == len(context))
            assert abs(sample.meta["tokens"] - length) <= 8       # re-tokenizing the seams moves a few
            assert not sample.meta["haystack_repeated"]


def test_needle_reproducible_and_random_start(haystack):
    a = make_needle(haystack, 500, 0.5, seed=1, random_start=True)
    assert make_needle(haystack, 500, 0.5, seed=1, random_start=True) == a
    b = make_needle(haystack, 500, 0.5, seed=2, random_start=True)
    assert a.prompt != b.prompt and a.prompt[:200] != b.prompt[:200]


def test_needle_short_haystack_repeats_and_errors(tokenizer):
    small = Haystack(tokenizer, "A short text. It repeats.")
    sample = make_needle(small, 200, 0.5, seed=0)
    assert sample.meta["haystack_repeated"] and sample.prompt.count(sample.answer) == 1
    with pytest.raises(ValueError, match="no room"):
        make_needle(small, 10, 0.5, seed=0)
    with pytest.raises(ValueError, match="empty"):
        haystack_text([[{"role": "user", "content": "  "}]])


def test_scoring():
    assert first_number(" 48213>") == "48213" and first_number("no digits") is None
    assert score_answer(" <48213> and 7", "48213")
    assert not score_answer(" 4821", "48213") and not score_answer("482130", "48213")
    assert not score_answer("the answer is 1, then 48213", "48213")
    results = [{"length": 8, "depth": 0.0, "correct": True}, {"length": 8, "depth": 0.0, "correct": False},
               {"length": 8, "depth": 1.0, "correct": True}, {"length": 16, "depth": 0.0, "correct": False}]
    assert accuracy_by(results, "length") == [{"length": 8, "accuracy": 2 / 3, "count": 3},
                                              {"length": 16, "accuracy": 0.0, "count": 1}]
    rows, columns, grid = accuracy_grid(results, rows="depth", columns="length")
    assert rows == [0.0, 1.0] and columns == [8, 16] and grid == [[0.5, 0.0], [1.0, None]]
    with pytest.raises(KeyError, match="lacks"):
        accuracy_by([{"length": 8}], "length")
    with pytest.raises(ValueError, match="at least one key"):
        accuracy_by(results)


def test_passkey_fits_the_length_with_the_key_once_at_its_depth(tokenizer):
    from longctx.eval.tasks import PASSKEY_FILLER, fit_passkey, make_passkey
    for length, depth, seed in [(300, 0.0, 1), (777, 0.5, 2), (2048, 1.0, 3), (1500, 0.3, 4)]:
        sample = fit_passkey(tokenizer, length, depth, seed)
        tokens = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
        assert tokens == sample.meta["tokens"] <= length
        bigger = make_passkey(sample.meta["fillers"] + 1, depth, seed)   # the most filler that fits
        assert len(tokenizer.encode(bigger.prompt, add_special_tokens=False)) > length
        assert occurrences(sample.answer, sample.prompt) == 2          # "is <key>. Remember it. <key> is"
        before = sample.prompt.split(f"The pass key is {sample.answer}")[0]
        assert before.count(PASSKEY_FILLER) == round(depth * sample.meta["fillers"])
        assert sample.prompt.endswith(sample.cue) and sample.cue == " The pass key is"
    assert fit_passkey(tokenizer, 900, 0.5, 7).prompt == fit_passkey(tokenizer, 900, 0.5, 7).prompt
    assert fit_passkey(tokenizer, 900, 0.5, 7).answer != fit_passkey(tokenizer, 900, 0.5, 8).answer


def test_chat_prompts_start_the_reply_with_the_cue(tokenizer):
    """The chat formats put the question in the user's turn and the cue ("Answer: <") at the start of
    the assistant's reply; plain keeps the text as it is after the begin-of-text token."""
    from longctx.eval.runner import encode_prompt, resolve_prompt_format
    sample = make_line_retrieval(5, 0.5, 0)
    plain = encode_prompt(tokenizer, sample.prompt, "plain", sample.cue)
    assert tokenizer.decode(plain) == "<|begin_of_text|>" + sample.prompt
    llama3 = tokenizer.decode(encode_prompt(tokenizer, sample.prompt, "llama3", sample.cue))
    assert llama3.endswith("Answer with the number only.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                           "Answer: <")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        assert resolve_prompt_format(tokenizer, "auto") == "chat"
        chat = tokenizer.decode(encode_prompt(tokenizer, sample.prompt, "auto", sample.cue))
        assert chat.endswith("Answer with the number only.<|im_end|>\n<|im_start|>assistant\nAnswer: <")
    finally:
        tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        resolve_prompt_format(tokenizer, "chat")


def test_prompts_made_by_several_processes_are_the_same(tokenizer, haystack):
    from longctx.eval.runner import build_prompts, encode_prompt
    for task in ("needle", "line_retrieval"):   # the haystack sent to the workers; the search for a length
        one = build_prompts(task, tokenizer, [200, 300], [0.0, 1.0], 2, seed=3, prompt_format="plain",
                            haystack=haystack, workers=1)
        two = build_prompts(task, tokenizer, [200, 300], [0.0, 1.0], 2, seed=3, prompt_format="plain",
                            haystack=haystack, workers=2)
        assert [s.prompt for s in one[0]] == [s.prompt for s in two[0]] and one[1] == two[1], task
        assert [len(ids) for ids in one[1]] == [len(encode_prompt(tokenizer, s.prompt, "plain")) for s in one[0]]
        assert [s.meta["length"] for s in one[0]] == [200] * 4 + [300] * 4
