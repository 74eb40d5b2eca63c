"""Reading and cleaning ShareGPT: the real sample, and small hand-made bad files."""
import json

import pytest

from longctx.data import DataConfig, DataError, prepare, read_sharegpt

SAMPLE = "data/sharegpt_sample.json"


def sharegpt(id_, *turns, **extra):
    return {"id": id_, "conversations": [{"from": r, "value": v} for r, v in turns], **extra}


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def assert_well_formed(conversation):
    roles = [m["role"] for m in conversation]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and len(roles) % 2 == 0, roles
    assert roles == ["user", "assistant"] * (len(roles) // 2), roles
    for message in conversation:
        assert isinstance(message["content"], str) and message["content"]
        assert message["content"] == message["content"].strip()


def test_real_sample_reads_and_accounts_for_every_record():
    conversations, report = read_sharegpt(SAMPLE)
    raw = json.loads(open(report["files"][0], encoding="utf-8").read())
    assert report["records"] == len(raw) == 300
    assert report["kept"] == len(conversations)
    assert report["kept"] + sum(report["skipped"].values()) == report["records"]
    assert report["truncated_at"] is None
    assert len(conversations) > 250
    for conversation in conversations:
        assert_well_formed(conversation)


def test_truncated_json_list_recovers_complete_records(tmp_path):
    records = [sharegpt(f"r{i}", ("human", f"question {i} é ✓"), ("gpt", f"answer {i}")) for i in range(5)]
    text = json.dumps(records, ensure_ascii=False, indent=2).encode("utf-8")
    fourth = text.index(b'"r3"')
    record_start = text.rindex(b"{", 0, fourth)
    cut = text[: fourth + 30]  # in the middle of the fourth record's string
    path = tmp_path / "cut.json"
    path.write_bytes(cut)
    conversations, report = read_sharegpt(path)
    assert [c[0]["content"] for c in conversations] == [f"question {i} é ✓" for i in range(3)]
    assert report["records"] == 3 and report["kept"] == 3
    assert report["truncated_at"] == record_start  # a byte offset, after multi-byte characters
    assert report["truncations"][0]["unparsed_bytes"] == len(cut) - record_start

    # cut right after a complete record: the closing bracket is all that is missing
    path.write_bytes(text[: text.rindex(b"}") + 1])
    conversations, report = read_sharegpt(path)
    assert len(conversations) == 5 and report["truncated_at"] == text.rindex(b"}") + 1


def test_json_lines_skips_bad_lines_and_recovers_a_cut_last_line(tmp_path):
    lines = [json.dumps(sharegpt(f"r{i}", ("human", f"q{i}"), ("gpt", f"a{i}"))) for i in range(4)]
    lines[1] = lines[1][:-5] + "!!"  # a corrupt line in the middle
    text = "\n".join(lines[:3]) + "\n" + lines[3][:20]
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    conversations, report = read_sharegpt(path)
    assert [c[0]["content"] for c in conversations] == ["q0", "q2"]
    assert report["skipped"] == {"invalid_json_line": 1}
    assert report["records"] == 3
    assert report["truncated_at"] == len(text) - 20
    assert "data.jsonl:2" in report["invalid_lines"][0]


def test_cleaning_rules(tmp_path):
    records = [
        sharegpt("unknown-role", ("human", "hi"), ("narrator", "ignored"), ("gpt", "hello")),
        sharegpt("empty-values", ("human", "  "), ("human", "q"), ("gpt", ""), ("gpt", "a-ev"), ("human", None)),
        sharegpt("leading-assistant", ("gpt", "orphan reply"), ("human", "q"), ("gpt", "a-la")),
        sharegpt("repeats", ("human", "q1"), ("human", "q2"), ("gpt", "a1"), ("gpt", "a1"), ("gpt", "a2")),
        sharegpt("no-assistant", ("human", "q1"), ("human", "q2")),
        sharegpt("only-assistant", ("gpt", "a")),
        sharegpt("non-string", ("human", "q"), ("gpt", 42)),
        sharegpt("systems", ("system", "be brief"), ("human", "q"), ("system", "be kind"), ("gpt", "a-sys"),
                 system="top level"),
        sharegpt("roles", ("user", "q"), ("chatgpt", "a1"), ("human", "q2"), ("bing", "a2"),
                 ("human", "q3"), ("bard", "a3"), ("user", "q4"), ("assistant", "a4")),
        sharegpt("trailing-user", ("human", "q"), ("gpt", "a-tu"), ("human", "unanswered")),
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "part"}]},
                      {"role": "assistant", "content": "openai"}]},
        sharegpt("empty", ),
        "not a record",
        {"id": "layout", "text": "plain text"},
    ]
    conversations, report = read_sharegpt(write_json(tmp_path / "bad.json", records))
    by_first = {c[-1]["content"]: c for c in conversations}
    assert report["skipped"] == {"no_assistant_turn": 1, "no_user_turn": 1, "non_string_value": 1,
                                 "empty_conversation": 1, "not_an_object": 1, "unknown_layout": 1}
    assert report["records"] == len(records) and report["kept"] == len(records) - 6
    assert by_first["hello"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert by_first["a-ev"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a-ev"}]
    assert by_first["a-la"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a-la"}]
    assert by_first["a-sys"] == [{"role": "system", "content": "top level\n\nbe brief\n\nbe kind"},
                                 {"role": "user", "content": "q"}, {"role": "assistant", "content": "a-sys"}]
    assert by_first["a-tu"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a-tu"}]
    assert by_first["a1\n\na2"] == [{"role": "user", "content": "q1\n\nq2"},
                                    {"role": "assistant", "content": "a1\n\na2"}]
    assert [m["role"] for m in by_first["a4"]] == ["user", "assistant"] * 4
    assert by_first["openai"][0] == {"role": "user", "content": "part"}
    # repairs are counted for kept records only (a skipped record is counted once, by its reason)
    assert report["repaired"] == {"unknown_role_turn_dropped": 1, "empty_turn_dropped": 3,
                                  "leading_assistant_dropped": 1, "repeated_role_merged": 2,
                                  "repeated_turn_dropped": 1, "system_messages_joined": 1,
                                  "trailing_user_dropped": 1}
    for conversation in conversations:
        assert_well_formed(conversation)


def test_empty_file_and_missing_path(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    conversations, report = read_sharegpt(empty)
    assert conversations == [] and report["records"] == 0 and report["empty_files"] == [str(empty)]
    with pytest.raises(DataError, match="data.path=.*empty.json is empty"):
        prepare(DataConfig(path=str(empty), cache_dir=str(tmp_path / "cache")))

    missing = tmp_path / "nowhere" / "sharegpt.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_sharegpt(missing)
    with pytest.raises(FileNotFoundError, match="data.path.*nowhere"):
        DataConfig(path=str(missing)).validate()


def test_folder_of_shards_parquet_and_saved_dataset(tmp_path):
    import datasets

    shards = tmp_path / "shards"
    shards.mkdir()
    write_json(shards / "b.json", [sharegpt("b", ("human", "qb"), ("gpt", "ab"))])
    (shards / "a.jsonl").write_text(json.dumps(sharegpt("a", ("human", "qa"), ("gpt", "aa"))) + "\n")
    (shards / "notes.txt").write_text("not data")
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(3)]
    datasets.Dataset.from_list(records[:1]).to_parquet(str(shards / "c.parquet"))
    conversations, report = read_sharegpt(shards)
    assert [c[0]["content"] for c in conversations] == ["qa", "qb", "q0"]  # files in name order
    assert report["records"] == 3 and report["ignored_files"] == [str(shards / "notes.txt")]

    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "chat.parquet"))
    conversations, report = read_sharegpt(tmp_path / "chat.parquet")
    assert [c[1]["content"] for c in conversations] == ["a0", "a1", "a2"]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    conversations, _ = read_sharegpt(tmp_path / "saved")
    assert [c[0]["content"] for c in conversations] == ["q0", "q1", "q2"]
