"""Chat templates and loss masks, checked token by token with the real Llama-3 tokenizer."""
import numpy as np
import pytest

from longctx.data import LLAMA3_CHAT_TEMPLATE, read_sharegpt, render_llama3, tokenize_conversations

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, of course. ✓"},
    {"role": "user", "content": "And in Roman numerals?"},
    {"role": "assistant", "content": "IV"},
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("data/tokenizer")
    assert tok.chat_template is None  # so "auto" means the built-in Llama-3 format
    return tok


def encode_segment(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_llama3(tokenizer, conversation, counted):
    """Ids and mask built segment by segment: header tokens never count, the content and <|eot_id|>
    of the messages in `counted` do."""
    ids, mask = [tokenizer.convert_tokens_to_ids("<|begin_of_text|>")], [0]
    for i, message in enumerate(conversation):
        header = encode_segment(tokenizer, f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n")
        body = encode_segment(tokenizer, message["content"]) + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        ids += header + body
        mask += [0] * len(header) + [int(i in counted)] * len(body)
    return ids, mask


def test_llama3_format_text_and_round_trip(tokenizer):
    rendered = render_llama3(CONVERSATION)
    assert rendered.text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one line.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4, of course. ✓<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd in Roman numerals?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIV<|eot_id|>")
    assert [rendered.text[a:b] for a, b in rendered.reply_spans] == ["4, of course. ✓<|eot_id|>", "IV<|eot_id|>"]
    columns = tokenize_conversations([CONVERSATION], tokenizer)
    ids = columns["input_ids"][0]
    assert tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False) == rendered.text
    # with the tokenizer's template set to the same format, rendering goes the generic way: same result
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    try:
        generic = tokenize_conversations([CONVERSATION], tokenizer, chat_template="tokenizer")
    finally:
        tokenizer.chat_template = None
    for name in ("input_ids", "loss_mask", "exchange_starts"):
        np.testing.assert_array_equal(generic[name][0], columns[name][0])


@pytest.mark.parametrize("loss_mask, counted", [("assistant", {2, 4}), ("last", {4}), ("all", None)])
def test_mask_token_by_token(tokenizer, loss_mask, counted):
    columns = tokenize_conversations([CONVERSATION], tokenizer, "llama3", loss_mask)
    ids, mask = columns["input_ids"][0], columns["loss_mask"][0]
    expected_ids, expected_mask = expected_llama3(tokenizer, CONVERSATION, counted or set())
    assert ids.tolist() == expected_ids
    assert mask.tolist() == (expected_mask if counted is not None else [1] * len(ids))
    assert columns["loss_tokens"][0] == int(mask.sum()) and columns["length"][0] == len(ids)
    # each user turn starts at its header
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    starts = columns["exchange_starts"][0].tolist()
    assert len(starts) == 2 and all(ids[s] == header and ids[s + 1] == tokenizer.convert_tokens_to_ids("user")
                                    for s in starts)


def masked_runs(tokenizer, ids, mask):
    edges = np.flatnonzero(np.diff(mask)) + 1
    return [tokenizer.decode(ids[run].tolist(), clean_up_tokenization_spaces=False)
            for run in np.split(np.arange(len(ids)), edges) if mask[run[0]]]


def test_real_conversations_mask_exactly_the_replies(tokenizer):
    conversations, _ = read_sharegpt("data/sharegpt_sample.json")
    rng = np.random.default_rng()
    chosen = [conversations[i] for i in rng.choice(len(conversations), 20, replace=False)]
    columns = tokenize_conversations(chosen, tokenizer)
    for conversation, ids, mask in zip(chosen, columns["input_ids"], columns["loss_mask"]):
        replies = [m["content"] + "<|eot_id|>" for m in conversation if m["role"] == "assistant"]
        assert masked_runs(tokenizer, ids, mask) == replies
        assert tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False) == render_llama3(conversation).text


def test_other_chat_template_masks_its_own_turn_ends(tokenizer):
    tokenizer.chat_template = CHATML
    try:
        columns = tokenize_conversations([CONVERSATION], tokenizer)  # auto: the tokenizer's template
    finally:
        tokenizer.chat_template = None
    ids, mask = columns["input_ids"][0], columns["loss_mask"][0]
    assert masked_runs(tokenizer, ids, mask) == ["4, of course. ✓<|im_end|>\n", "IV<|im_end|>\n"]
    assert tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).startswith("<|im_start|>system\n")


def test_template_errors(tokenizer):
    with pytest.raises(ValueError, match="no chat_template.*chat_template=llama3"):
        tokenize_conversations([CONVERSATION], tokenizer, chat_template="tokenizer")
    with pytest.raises(ValueError, match="unknown loss_mask"):
        tokenize_conversations([CONVERSATION], tokenizer, loss_mask="replies")
    # a template whose output for the first turns is not a prefix of the whole: the mask cannot be found
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(ValueError, match="prefix.*chat_template=llama3"):
            tokenize_conversations([CONVERSATION], tokenizer)
    finally:
        tokenizer.chat_template = None

    class NoLlamaTokens:
        chat_template = None

        def get_vocab(self):
            return {"<|begin_of_text|>": 0}
    with pytest.raises(ValueError, match="lacks"):
        tokenize_conversations([CONVERSATION], NoLlamaTokens())
