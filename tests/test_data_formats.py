"""The dataset layer (shared/data/formats/): containers, formats, conversions, problems and hostile files.

Real samples (tests/fixtures/datasets, see its SOURCE.md) must be detected and converted; each file of the
broken corpus (tests/fixtures/broken) must get its exact message; hostile files, generated here and never
committed, must be refused quickly in bounded memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.data.file_validation import chat_example_problem
from shared.data.formats import (
    FORMATS,
    DataFormatError,
    DataLimits,
    DatasetCheck,
    Example,
    check_dataset,
    detect_container,
    detect_format,
    read_examples,
)

FIXTURES = Path(__file__).parent / "fixtures"
MIB = 1 << 20
GIB = 1 << 30


def check(data: bytes, filename: str = "data.jsonl", **kwargs: Any) -> DatasetCheck:
    return check_dataset(io.BytesIO(data), filename=filename, **kwargs)


def examples(data: bytes, filename: str = "data.jsonl", **kwargs: Any) -> list[Example]:
    return list(read_examples(io.BytesIO(data), filename=filename, **kwargs))


def jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(record, ensure_ascii=False).encode() + b"\n" for record in records)


def json_array(records: list[Any]) -> bytes:
    return json.dumps(records, indent=2, ensure_ascii=False).encode()


def csv_bytes(records: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in record.items()})
    return out.getvalue().encode()


def parquet_bytes(records: list[dict[str, Any]], **kwargs: Any) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), out, **kwargs)
    return out.getvalue()


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = chat(("user", "Hi"), ("assistant", "Hello."))


def assert_trainable(example: Example) -> None:
    """What the trainer relies on: every converted conversation passes the chat checks."""
    if example.kind == "chat":
        assert chat_example_problem({"messages": example.messages}) is None, example
    elif example.kind == "preference":
        assert example.messages and example.chosen and example.rejected
        for reply in (example.chosen, example.rejected):
            assert chat_example_problem({"messages": example.messages + reply}) is None, example
    elif example.kind == "classification":
        assert isinstance(example.label, str) and example.label.strip() and example.text
    else:
        assert example.kind == "text" and example.text and example.text.strip()


# -- real samples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "container", "format", "task", "n"),
    [
        ("alpaca_en_demo.json", "json", "alpaca", "chat", 30),
        ("dpo_en_demo.json", "json", "preference", "preference", 30),
        ("glaive_toolcall_en_demo.json", "json", "sharegpt", "chat", 30),
        ("kto_en_demo_label_true.json", "json", "chat", "chat", 30),
        ("dummy_conversation.json", "json", "sharegpt", "chat", 30),
        ("sst2_train_200.csv", "csv", "classification", "classification", 200),
    ],
)
def test_real_samples_are_detected_and_converted(
    name: str, container: str, format: str, task: str, n: int
) -> None:
    path = FIXTURES / "datasets" / name
    with open(path, "rb") as f:
        result = check_dataset(f, filename=name)
    assert (result.container, result.format, result.task, result.n_examples) == (container, format, task, n)
    assert result.ok, result.problems
    assert result.summary() == f"{n} {format} examples"
    with open(path, "rb") as f:
        converted = list(read_examples(f, filename=name))
    assert len(converted) == n
    assert [e.source for e in converted[:2]] == (
        ["row 1", "row 2"] if container == "csv" else ["item 1", "item 2"]
    )
    for example in converted:
        assert example.kind == task
        assert_trainable(example)


def load_fixture(name: str) -> tuple[list[dict[str, Any]], list[Example]]:
    path = FIXTURES / "datasets" / name
    with open(path, "rb") as f:
        converted = list(read_examples(f, filename=name))
    return json.loads(path.read_text(encoding="utf-8")), converted


def test_alpaca_joins_instruction_and_input_with_a_blank_line() -> None:
    records, converted = load_fixture("alpaca_en_demo.json")
    for record, example in zip(records, converted, strict=True):
        user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        assert example.messages == [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    assert any(record["input"] for record in records) and any(not record["input"] for record in records)


def test_sharegpt_tool_calls_map_to_assistant_and_tool_turns_with_openai_tools() -> None:
    records, converted = load_fixture("glaive_toolcall_en_demo.json")
    roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    for record, example in zip(records, converted, strict=True):
        assert example.messages == [
            {"role": roles[turn["from"]], "content": turn["value"]} for turn in record["conversations"]
        ]
        schemas = json.loads(record["tools"])
        assert example.tools == ([{"type": "function", "function": s} for s in schemas] or None)
    calls = [m for e in converted for m in e.messages or [] if m["role"] == "tool"]
    assert calls, "the sample holds function calls and observations"


def test_llamafactory_preference_pairs_keep_system_turns_and_the_reply_objects() -> None:
    records, converted = load_fixture("dpo_en_demo.json")
    for record, example in zip(records, converted, strict=True):
        assert example.kind == "preference"
        assert [m["content"] for m in example.messages or []] == [t["value"] for t in record["conversations"]]
        assert example.chosen == [{"role": "assistant", "content": record["chosen"]["value"]}]
        assert example.rejected == [{"role": "assistant", "content": record["rejected"]["value"]}]
    assert any(example.messages[0]["role"] == "system" for example in converted if example.messages)


def test_chat_keeps_extra_keys_in_fields_and_sharegpt_ids_too() -> None:
    _, kto = load_fixture("kto_en_demo_label_true.json")
    assert all(example.fields == {"label": True} for example in kto)
    records, sharegpt = load_fixture("dummy_conversation.json")
    assert [e.fields for e in sharegpt] == [{"id": r["id"]} for r in records]


def test_sst2_csv_labels_are_strings_and_counted() -> None:
    with open(FIXTURES / "datasets" / "sst2_train_200.csv", "rb") as f:
        result = check_dataset(f, filename="sst2_train_200.csv")
    assert result.stats["labels"] == {"1": 113, "0": 87}
    _, converted = load_fixture_csv()
    assert converted[0].text == (
        "a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror films"
    )
    assert converted[0].label == "1"


def load_fixture_csv() -> tuple[None, list[Example]]:
    with open(FIXTURES / "datasets" / "sst2_train_200.csv", "rb") as f:
        return None, list(read_examples(f, filename="sst2_train_200.csv"))


# -- every format in every container ------------------------------------------------------------------

RECORDS: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}.", "weight": i % 2},
            ]
        }
        for i in range(12)
    ],
    "prompt_completion": [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(12)],
    "text": [{"text": f"Plain text number {i}."} for i in range(12)],
    "alpaca": [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "Show your work.", "output": str(i + 1)}
        for i in range(12)
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"Hi {i}"},
                {"from": "gpt", "value": "Hello."},
            ]
        }
        for i in range(12)
    ],
    "preference": [{"prompt": f"Say hi {i}", "chosen": "Hi!", "rejected": "No."} for i in range(12)],
    "classification": [
        {"text": f"review {i}", "label": ["neg", "pos"][i % 2], "group": "a"} for i in range(12)
    ],
}


def expected_first(format: str) -> Example:
    return {
        "chat": Example(kind="chat", source="", messages=RECORDS["chat"][0]["messages"]),
        "prompt_completion": Example(
            kind="chat",
            source="",
            messages=[{"role": "user", "content": "0 + 1 ="}, {"role": "assistant", "content": "1"}],
        ),
        "text": Example(kind="text", source="", text="Plain text number 0."),
        "alpaca": Example(
            kind="chat",
            source="",
            messages=[
                {"role": "user", "content": "Add 0 and 1.\n\nShow your work."},
                {"role": "assistant", "content": "1"},
            ],
        ),
        "sharegpt": Example(
            kind="chat",
            source="",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi 0"},
                {"role": "assistant", "content": "Hello."},
            ],
        ),
        "preference": Example(
            kind="preference",
            source="",
            messages=[{"role": "user", "content": "Say hi 0"}],
            chosen=[{"role": "assistant", "content": "Hi!"}],
            rejected=[{"role": "assistant", "content": "No."}],
        ),
        "classification": Example(
            kind="classification", source="", text="review 0", label="neg", fields={"group": "a"}
        ),
    }[format]


def containers(records: list[dict[str, Any]]) -> Iterator[tuple[str, str, bytes]]:
    yield "jsonl", "data.jsonl", jsonl(records)
    yield "json", "data.json", json_array(records)
    yield "jsonl.gz", "data.jsonl.gz", gzip.compress(jsonl(records))
    yield "json.gz", "data.json.gz", gzip.compress(json_array(records))
    yield "csv", "data.csv", csv_bytes(records)
    yield "csv.gz", "data.csv.gz", gzip.compress(csv_bytes(records))
    yield "parquet", "data.parquet", parquet_bytes(records)


@pytest.mark.parametrize("format", FORMATS)
def test_every_format_reads_the_same_from_every_container(format: str) -> None:
    records = RECORDS[format]
    for container, filename, data in containers(records):
        result = check(data, filename)
        assert (result.container, result.format, result.n_examples, result.problems) == (
            container,
            format,
            12,
            [],
        ), container
        converted = examples(data, filename)
        first = expected_first(format)
        row = (
            "row"
            if container.startswith(("csv", "parquet"))
            else ("item" if "json." in container + "." else "line")
        )
        assert converted[0].source == f"{row} 1", container
        assert (converted[0].kind, converted[0].messages, converted[0].text, converted[0].label) == (
            first.kind,
            first.messages,
            first.text,
            first.label,
        ), container
        assert (converted[0].chosen, converted[0].rejected, converted[0].fields) == (
            first.chosen,
            first.rejected,
            first.fields,
        ), container
        for example in converted:
            assert_trainable(example)


def test_openai_dpo_records_become_preference_examples_with_their_tools() -> None:
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    record = {
        "input": {
            "messages": [{"role": "user", "content": "Time?"}],
            "tools": [tool],
            "parallel_tool_calls": False,
        },
        "preferred_output": [{"role": "assistant", "content": "Noon."}],
        "non_preferred_output": [{"role": "assistant", "content": "Dunno."}],
    }
    result = check(jsonl([record] * 10))
    assert (result.format, result.task, result.problems) == ("preference", "preference", [])
    example = examples(jsonl([record] * 10))[0]
    assert example.messages == [{"role": "user", "content": "Time?"}]
    assert (example.chosen, example.rejected) == (record["preferred_output"], record["non_preferred_output"])
    assert example.tools == [tool]
    assert example.fields == {"parallel_tool_calls": False}
    assert example.to_record() == {
        "input": {"messages": record["input"]["messages"], "tools": [tool]},
        "preferred_output": record["preferred_output"],
        "non_preferred_output": record["non_preferred_output"],
    }


def test_trl_conversational_preference_pairs_are_accepted() -> None:
    record = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "What?"}],
    }
    example = examples(jsonl([record] * 10))[0]
    assert example.messages == record["prompt"]
    assert example.chosen == record["chosen"]


def test_alpaca_system_and_history_come_before_the_instruction() -> None:
    record = {
        "system": "Be brief.",
        "history": [["What is 1+1?", "2"]],
        "instruction": "And 2+2?",
        "input": "",
        "output": "4",
    }
    example = examples(jsonl([record] * 10))[0]
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_chat_tool_calls_and_tools_pass_through() -> None:
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 21}'},
            {"role": "assistant", "content": "21 °C."},
        ],
        "tools": [tool],
    }
    example = examples(jsonl([record] * 10))[0]
    assert example.messages == record["messages"] and example.tools == [tool]
    assert example.to_record() == record


def test_classification_labels_may_be_integers_and_are_kept_as_strings() -> None:
    records = [{"text": f"t{i}", "label": i % 3} for i in range(12)]
    result = check(jsonl(records))
    assert result.stats["labels"] == {"0": 4, "1": 4, "2": 4}
    assert [e.label for e in examples(jsonl(records))[:3]] == ["0", "1", "2"]


def test_an_explicit_format_overrides_detection() -> None:
    records = RECORDS["classification"]
    as_text = check(jsonl(records), format="text")
    assert (as_text.format, as_text.task, as_text.problems) == ("text", "text", [])
    assert examples(jsonl(records), format="text")[0].fields == {"label": "neg", "group": "a"}
    with pytest.raises(ValueError, match="unknown format 'dpo'"):
        check(jsonl(records), format="dpo")
    with pytest.raises(ValueError, match="unknown format 'dpo'"):
        read_examples(io.BytesIO(jsonl(records)), filename="data.jsonl", format="dpo")  # before iterating


def test_csv_cells_of_structured_columns_are_parsed_as_json() -> None:
    data = csv_bytes(RECORDS["chat"])
    assert b'"[{""role"": ""system""' in data
    assert examples(data, "chat.csv")[1].messages == RECORDS["chat"][1]["messages"]
    broken = data.replace(b'"[{""role"": ""system""', b'"[{""role"" ""system""', 1)
    assert check(broken, "chat.csv").problems == [
        "row 1: messages: not valid JSON (Expecting ':' delimiter)",
    ]


def test_parquet_nested_messages_lose_the_nulls_arrow_adds() -> None:
    # Arrow gives every message struct a `weight` field; messages without one must not get `weight: null`.
    data = parquet_bytes(RECORDS["chat"], row_group_size=5)
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 3
    converted = examples(data, "chat.parquet")
    assert [e.messages for e in converted] == [r["messages"] for r in RECORDS["chat"]]
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": w}]}
        for w in (0, None) * 6
    ]
    converted = examples(parquet_bytes(records), "chat.parquet")
    assert converted[0].messages[1] == {"role": "assistant", "content": "Yo", "weight": 0}
    assert converted[1].messages[1] == {"role": "assistant", "content": "Yo"}


# -- the broken corpus ----------------------------------------------------------------------------------

KEYS_HINT = (
    'expected "messages", "prompt" + "completion", "text" (+ "label"), "instruction" + "output", '
    '"conversations", "prompt" + "chosen" + "rejected", or "input" + "preferred_output" + "non_preferred_output"'
)
BROKEN: list[tuple[str, str | None, list[str]]] = [
    ("bad_json.jsonl", None, ["line 11: invalid JSON: Expecting value at column 49"]),
    (
        "wrong_role.jsonl",
        None,
        ['line 11: messages[2].role: "assitant" is not one of system, user, assistant, tool'],
    ),
    (
        "missing_assistant.jsonl",
        None,
        ["line 11: no assistant message: every example needs at least one assistant turn to learn from"],
    ),
    (
        "roles_not_alternating.jsonl",
        None,
        ["line 11: messages[1].role: two user messages in a row; user and assistant turns must alternate"],
    ),
    ("system_not_first.jsonl", None, ["line 11: messages[1].role: a system message may only come first"]),
    (
        "two_formats.jsonl",
        None,
        [
            "line 11: a prompt_completion example, but the file holds chat examples (detected from line 1); "
            "a file must hold a single format"
        ],
    ),
    ("too_few_examples.jsonl", None, ["the file has 3 valid examples; at least 10 are required"]),
    ("not_utf8_line.jsonl", None, ["line 201: not valid UTF-8 (byte 46)"]),
    (
        "not_utf8_at_start.jsonl",
        None,
        ["the file is not UTF-8 text (byte 43, on line 1, is 0xff); save it as UTF-8"],
    ),
    ("csv_latin1.csv", None, ["the file is not UTF-8 text (byte 14, on line 2, is 0xe9); save it as UTF-8"]),
    ("utf16.jsonl", None, ["the file is UTF-16 text; save it as UTF-8"]),
    (
        "binary_garbage.jsonl",
        None,
        ["the file holds binary data, not text (a NUL byte at byte 143); upload UTF-8 text or Parquet"],
    ),
    (
        "spreadsheet.xlsx",
        None,
        [
            "Excel workbooks are not supported; upload .jsonl, .json, .csv or .parquet (or .jsonl.gz, .json.gz, .csv.gz)"
        ],
    ),
    ("bad_weight.jsonl", None, ["line 11: messages[1].weight: must be 0 or 1"]),
    (
        "weight_on_user.jsonl",
        None,
        ["line 11: messages[0].weight: only assistant messages may carry a weight"],
    ),
    ("empty_messages.jsonl", None, ['line 11: "messages" must be a non-empty list']),
    ("content_not_string.jsonl", None, ["line 11: messages[0].content: missing or not a string"]),
    ("line_not_an_object.jsonl", None, ["line 11: expected a JSON object, got an array"]),
    ("unknown_format.jsonl", None, [f"line 1: no known format has the keys question, answer; {KEYS_HINT}"]),
    ("text_empty.jsonl", None, ["line 11: text: empty"]),
    (
        "classification_float_label.jsonl",
        None,
        ["line 11: label: must be a string or an integer, got a number"],
    ),
    ("classification_missing_label.jsonl", None, ['line 11: missing "label"']),
    ("completion_not_string.jsonl", None, ["line 11: completion: must be a string, got a number"]),
    ("preference_without_rejected.jsonl", None, ['line 11: missing "rejected" (the rejected reply)']),
    (
        "dpo_without_non_preferred_output.jsonl",
        None,
        ['line 11: missing "non_preferred_output" (a list holding the rejected assistant message)'],
    ),
    (
        "dpo_reply_not_assistant.jsonl",
        None,
        ["line 11: preferred_output[0].role: the reply must be an assistant message"],
    ),
    (
        "sharegpt_unknown_from.json",
        None,
        [
            'item 11: conversations[1].from: "bot" is not one of human, gpt, system, function_call, observation'
        ],
    ),
    (
        "sharegpt_not_alternating.json",
        None,
        [
            "item 11: conversations[2].from: two assistant messages in a row; user and assistant turns must alternate"
        ],
    ),
    ("alpaca_missing_output.json", None, ['item 11: missing "output"']),
    ("json_array_non_object_item.json", None, ["item 11: expected a JSON object, got a string"]),
    (
        "json_array_invalid_item.json",
        None,
        ["item 11: invalid JSON: Expecting ',' delimiter at line 54 column 3"],
    ),
    (
        "json_array_not_closed.json",
        None,
        ['the file ends inside the JSON array (no closing "]" after item 12)'],
    ),
    ("json_array_trailing_comma.json", None, ["item 10: invalid JSON: a comma after the last item"]),
    (
        "json_single_object.json",
        None,
        [
            "the file holds one JSON object spread over several lines; upload a JSON array of examples, "
            "or JSONL with one example per line"
        ],
    ),
    (
        "csv_missing_label_column.csv",
        "classification",
        ['the header has no "label" column (the columns are: text, sentiment)'],
    ),
    ("csv_ragged_row.csv", None, ["row 11: 3 fields, but the header has 2 columns"]),
    (
        "csv_unclosed_quote.csv",
        None,
        ['row 11: invalid CSV: unexpected end of data (is a closing " missing?)'],
    ),
    ("csv_duplicate_column.csv", None, ['the header names the column "text" twice']),
    ("csv_empty_label.csv", None, ["row 11: label: empty"]),
    (
        "csv_no_known_columns.csv",
        None,
        [
            f"no known format has the columns review, stars; {KEYS_HINT.replace('expected', 'expected columns')}"
        ],
    ),
    ("gzip_truncated.jsonl.gz", None, ["the gzip data ends early: the file is truncated"]),
    (
        "gzip_corrupt.jsonl.gz",
        None,
        ["the gzip data is corrupt (Error -3 while decompressing data: invalid code lengths set)"],
    ),
]


@pytest.mark.parametrize(("name", "format", "expected"), BROKEN, ids=[case[0] for case in BROKEN])
def test_each_broken_file_gets_its_exact_message(name: str, format: str | None, expected: list[str]) -> None:
    with open(FIXTURES / "broken" / name, "rb") as f:
        result = check_dataset(f, filename=name, format=format)
    assert result.problems == expected
    assert result.total_problems == len(expected)
    assert not result.ok
    if "valid examples" in expected[0]:
        return  # read_examples does not count examples (see below)
    with open(FIXTURES / "broken" / name, "rb") as f, pytest.raises(DataFormatError) as raised:
        for _ in read_examples(f, filename=name, format=format):
            pass
    assert str(raised.value) == expected[0]


def test_read_examples_does_not_enforce_the_minimum() -> None:
    with open(FIXTURES / "broken" / "too_few_examples.jsonl", "rb") as f:
        assert len(list(read_examples(f, filename="too_few_examples.jsonl"))) == 3


def test_every_broken_fixture_has_a_case() -> None:
    on_disk = {p.name for p in (FIXTURES / "broken").iterdir()} - {"README.md"}
    assert on_disk == {case[0] for case in BROKEN}


PARQUET_BROKEN: list[tuple[str, bytes, str | None, dict[str, Any], list[str]]] = [
    (
        "wrong column",
        parquet_bytes([{"txt": "a", "label": 1}] * 12),
        "classification",
        {},
        ['the file has no "text" column (the columns are: txt, label)'],
    ),
    (
        "unknown columns",
        parquet_bytes([{"txt": "a", "stars": 1}] * 12),
        None,
        {},
        [f"no known format has the columns txt, stars; {KEYS_HINT.replace('expected', 'expected columns')}"],
    ),
    (
        "wrong type",
        parquet_bytes([{"text": "a", "label": 0.5}] * 12),
        None,
        {},
        [f"row {i}: label: must be a string or an integer, got a number" for i in range(1, 13)]
        + ["the file has 0 valid examples; at least 10 are required"],
    ),
    (
        "missing value",
        parquet_bytes([{"text": "a", "label": "x"}] * 11 + [{"text": "b", "label": None}]),
        None,
        {},
        ['row 12: missing "label"'],
    ),
    (
        "a null in a column the format needs, where another format's columns are present",
        parquet_bytes(
            [{"prompt": "p", "completion": "c", "text": "t", "label": 1}] * 11
            + [{"prompt": None, "completion": "c", "text": "t", "label": 1}]
        ),
        None,
        {},
        ['row 12: missing "prompt"'],
    ),
    (
        "too many columns",
        parquet_bytes([{f"c{i}": 1 for i in range(300)}]),
        None,
        {},
        ["the file has 300 columns; at most 256 are allowed"],
    ),
    (
        "cell too big",
        parquet_bytes([{"text": "x" * 5000, "label": 1}] + [{"text": "x", "label": 1}] * 10),
        None,
        {"limits": DataLimits(max_field_bytes=1000)},
        ["row 1: text: longer than the limit of 1000 bytes"],
    ),
    (
        "not parquet",
        b"PAR1 this is not really parquet",
        None,
        {},
        [
            "not a readable Parquet file (Parquet magic bytes not found in footer. Either the file is corrupted "
            "or this is not a parquet file.)"
        ],
    ),
]


@pytest.mark.parametrize(
    ("data", "format", "kwargs", "expected"),
    [c[1:] for c in PARQUET_BROKEN],
    ids=[c[0] for c in PARQUET_BROKEN],
)
def test_broken_parquet_files_get_exact_messages(
    data: bytes, format: str | None, kwargs: dict[str, Any], expected: list[str]
) -> None:
    assert check(data, "data.parquet", format=format, **kwargs).problems == expected[:20]


def test_parquet_nested_too_deeply_is_refused() -> None:
    value: Any = "x"
    for _ in range(70):
        value = {"a": value}
    data = parquet_bytes([{"text": "hi", "deep": value}] * 10)
    assert check(data, "deep.parquet").problems == [
        'column "deep" is nested too deeply (more than 64 levels)'
    ]


def test_parquet_that_expands_like_a_bomb_is_refused_from_its_metadata() -> None:
    data = parquet_bytes(
        [{"text": "a" * 100_000, "label": 1}] * 200, compression="zstd", use_dictionary=False
    )
    assert len(data) < 10_000
    assert check(data, "bomb.parquet").problems == [
        "the file expands more than 200 times when decompressed, like a compression bomb"
    ]


# -- rules across the file ------------------------------------------------------------------------------


def test_only_the_first_20_problems_are_listed_but_all_are_counted() -> None:
    data = jsonl([GOOD_CHAT] * 10) + b"[]\n" * 25
    result = check(data)
    assert result.total_problems == 25
    assert result.problems == [f"line {n}: expected a JSON object, got an array" for n in range(11, 31)]
    assert result.summary() == f"25 problems: {'; '.join(result.problems)} (and 5 more)"


def test_the_first_recognizable_record_decides_the_format() -> None:
    data = b'{"oops": 1}\n' + jsonl([{"text": "hello"}] * 10) + jsonl([GOOD_CHAT])
    result = check(data)
    assert result.format == "text"
    assert result.problems == [
        f"line 1: no known format has the keys oops; {KEYS_HINT}",
        "line 12: a chat example, but the file holds text examples (detected from line 2); a file must hold a single format",
    ]


def test_an_incomplete_record_is_named_by_what_it_misses_not_as_another_format() -> None:
    data = jsonl([{"text": "x", "label": "a"}] * 10 + [{"text": "y"}])
    assert check(data).problems == ['line 11: missing "label"']
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}]}
    pairs = [
        {**sharegpt, "chosen": {"from": "gpt", "value": "Hi!"}, "rejected": {"from": "gpt", "value": "No."}}
    ]
    assert check(json_array(pairs * 10 + [sharegpt]), "p.json").problems == [
        'item 11: missing "chosen" (the chosen reply)'
    ]


def test_blank_lines_keep_their_line_numbers_and_a_bom_is_ignored() -> None:
    data = b"\xef\xbb\xbf" + jsonl([GOOD_CHAT] * 5) + b"\n  \r\n" + jsonl([GOOD_CHAT] * 5) + b"[]"
    result = check(data)
    assert (result.n_examples, result.problems) == (10, ["line 13: expected a JSON object, got an array"])


def test_an_empty_file_has_no_format_and_too_few_examples() -> None:
    for name in ("empty.jsonl", "empty.json", "empty.csv"):
        result = check(b"", name)
        assert (result.format, result.problems) == (
            None,
            ["the file has 0 valid examples; at least 10 are required"],
        )
    assert check(b"[]", "empty.json").problems == ["the file has 0 valid examples; at least 10 are required"]


def test_a_line_over_the_limit_is_skipped_and_the_next_still_read() -> None:
    data = jsonl([GOOD_CHAT] * 10) + b'{"text": "' + b"x" * 500 + b'"}\n' + b"[]\n"
    result = check(data, limits=DataLimits(max_line_bytes=200))
    assert result.problems == [
        "line 11: line is longer than the limit of 200 bytes",
        "line 12: expected a JSON object, got an array",
    ]


def test_a_json_array_item_over_the_limit_is_skipped_and_the_next_still_read() -> None:
    items = [GOOD_CHAT] * 5 + [{"text": "x" * 5000}] + [GOOD_CHAT] * 5
    result = check(json_array(items), "a.json", limits=DataLimits(max_line_bytes=1000))
    assert (result.n_examples, result.problems) == (
        10,
        ["item 6: item is longer than the limit of 1000 bytes"],
    )


def test_invalid_json_array_items_are_skipped_when_their_brackets_balance() -> None:
    data = b'[{"text": "a"}, {"text": "b" "c"}, {"text": "d"}, {"text": "e\\"]}"}]'
    result = check(data, "a.json", limits=DataLimits(min_examples=1))
    assert result.problems == ["item 2: invalid JSON: Expecting ',' delimiter at line 1 column 30"]
    assert [e.text for e in examples(data.replace(b' "c"', b""), "a.json")] == ["a", "b", "d", 'e"]}']


def test_data_after_a_json_array_is_a_problem() -> None:
    data = json_array([GOOD_CHAT] * 10) + b"\n[]"
    assert check(data, "a.json").problems == ["unexpected data after the JSON array at line 123 column 1"]


class Trickle(io.RawIOBase):
    """A file that hands out a few bytes per read, to split records at every kind of boundary."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step, self._pos = data, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_records_split_across_reads_parse_the_same(step: int) -> None:
    records = [chat(("user", 'Ça va ? ✓ 日本 "quoted" \\ back'), ("assistant", "Très bien 🙂"))] * 10
    for name, data in (
        ("a.jsonl", jsonl(records)),
        ("a.json", json_array(records)),
        ("a.csv", csv_bytes(records)),
    ):
        result = check_dataset(Trickle(data, step), filename=name)  # type: ignore[arg-type]
        assert (result.n_examples, result.problems) == (10, []), name
        converted = list(read_examples(Trickle(data, step), filename=name))  # type: ignore[arg-type]
        assert [e.messages for e in converted] == [r["messages"] for r in records], name


def test_too_many_distinct_labels_is_one_problem() -> None:
    records = [{"text": f"t{i}", "label": f"l{i}"} for i in range(30)]
    result = check(jsonl(records), limits=DataLimits(max_labels=20))
    assert result.problems == [
        "line 21: label: more than 20 distinct labels; classification needs a fixed set of classes"
    ]
    assert len(result.stats["labels"]) == 20


# -- statistics and personal data --------------------------------------------------------------------------


def test_stats_count_duplicates_empty_turns_and_lengths() -> None:
    records = [chat(("user", "Hi"), ("assistant", "x" * n)) for n in range(1, 11)]
    records += [records[0], records[0], chat(("user", "  "), ("assistant", "\n"))]
    result = check(jsonl(records))
    assert result.stats == {
        "exact_duplicates": 2,
        "near_duplicates": 0,
        "near_duplicate_pairs": [],
        "compared_examples": 11,
        "similarity_threshold": 0.8,
        "empty_turns": 2,
        "characters": {
            "p50": 6,
            "p95": 12,
            "max": 12,
            # lengths 3 (four times: "Hi" + "x", twice more the same, "  " + "\n") and 4 to 12 once each
            "histogram": {"edges": list(range(3, 14)), "counts": [4] + [1] * 9},
        },
    }


def test_near_duplicates_are_counted_with_the_first_pairs() -> None:
    answer = "The capital of France is Paris, a city on the Seine known for its museums and cafes."
    records = [
        chat(("user", f"Question number {i} about geography and rivers"), ("assistant", f"Answer {i}."))
        for i in range(10)
    ]
    records += [
        chat(("user", "Tell me about the capital of France"), ("assistant", answer)),
        chat(
            ("user", "Tell me about the capital of France"), ("assistant", answer.replace("cafes", "parks"))
        ),
    ]
    stats = check(jsonl(records)).stats
    assert stats["near_duplicates"] == 1
    assert stats["near_duplicate_pairs"] == [["line 11", "line 12"]]


def test_personal_data_is_counted_by_kind_with_where_it_was_first_seen() -> None:
    records = [GOOD_CHAT] * 10 + [
        chat(("user", "Mail me at jane.doe@example.com"), ("assistant", "Sure.")),
        chat(("user", "My card is 4111 1111 1111 1111"), ("assistant", "Please don't share that.")),
        chat(("user", "Key AKIAIOSFODNN7EXAMPLE and bob@example.org"), ("assistant", "Rotate it.")),
    ]
    result = check(jsonl(records))
    assert result.pii == {
        "counts": {"email": 2, "payment_card": 1, "aws_access_key": 1},
        "first_seen": {
            "email": ["line 11", "line 13"],
            "payment_card": ["line 12"],
            "aws_access_key": ["line 13"],
        },
    }
    assert check(jsonl(records), scan_pii=False).pii == {"counts": {}, "first_seen": {}}


def test_example_to_record_gives_canonical_shapes() -> None:
    assert Example(kind="text", source="line 1", text="hi").to_record() == {"text": "hi"}
    assert Example(kind="classification", source="row 1", text="hi", label="1").to_record() == {
        "text": "hi",
        "label": "1",
    }
    assert Example(kind="chat", source="item 1", messages=GOOD_CHAT["messages"]).to_record() == GOOD_CHAT


# -- detection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "head", "container"),
    [
        ("train.jsonl", b'{"messages": []}', "jsonl"),
        ("train.ndjson", b'{"messages": []}', "jsonl"),
        ("train.json", b'[{"messages": []}]', "json"),
        ("train.json", b'{"messages": []}\n{"messages": []}', "jsonl"),  # JSON Lines named .json
        ("train.jsonl", b'\n[\n  {"text": "a"}\n]', "json"),  # a pretty-printed JSON array named .jsonl
        ("train.jsonl", b'[{"text": "a"}]\n', "jsonl"),  # a line that is an array: a (wrong) JSONL record
        ("TRAIN.CSV", b"text,label\n", "csv"),
        ("train.parquet", b"PAR1\x15\x04", "parquet"),
        ("upload", b"PAR1\x15\x04", "parquet"),
        ("upload", b'[{"text": "a"}]', "json"),
        ("upload", b'{"text": "a"}\n', "jsonl"),
        ("upload.txt", b"text,label\nhi,1\n", "csv"),
        ("train.jsonl.gz", gzip.compress(b'{"text": "a"}\n'), "jsonl.gz"),
        ("train.csv.gz", gzip.compress(b"text,label\n"), "csv.gz"),
        ("upload", gzip.compress(b'[{"text": "a"}]'), "json.gz"),
        ("dir/train.json.gz", gzip.compress(b'[{"text": "a"}]'), "json.gz"),
    ],
)
def test_detect_container(filename: str, head: bytes, container: str) -> None:
    assert detect_container(filename, head) == container


@pytest.mark.parametrize(
    ("filename", "head", "message"),
    [
        (
            "upload",
            b"hello world\n",
            "cannot tell what kind of file this is: name it .jsonl, .json, .csv or .parquet (or .jsonl.gz, .json.gz, .csv.gz)",
        ),
        (
            "data.zip",
            b"PK\x03\x04",
            "zip archives are not supported; upload .jsonl, .json, .csv or .parquet (or .jsonl.gz, .json.gz, .csv.gz)",
        ),
        ("data.jsonl.gz", b'{"text": "a"}', "the file is named .gz but is not gzip data"),
        (
            "data.parquet.gz",
            gzip.compress(b"PAR1...."),
            "gzip-compressed Parquet is not supported: Parquet compresses its own pages; upload the .parquet file",
        ),
    ],
)
def test_detect_container_refuses_what_it_cannot_read(filename: str, head: bytes, message: str) -> None:
    with pytest.raises(DataFormatError) as raised:
        detect_container(filename, head)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("record", "format"),
    [
        ({"messages": [], "label": True}, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
        ({"text": "a", "label": 1, "group": "g"}, "classification"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": [], "tools": "[]"}, "sharegpt"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "preference"),
        ({"input": {"messages": []}, "preferred_output": []}, "preference"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"prompt": "a"}, None),
        ({"question": "a", "answer": "b"}, None),
    ],
)
def test_detect_format(record: dict[str, Any], format: str | None) -> None:
    assert detect_format(record) == format


# -- hostile files --------------------------------------------------------------------------------------


class Repeating(io.RawIOBase):
    """head + `size` bytes of a repeated block + tail, served without ever holding them: a huge file."""

    def __init__(self, head: bytes, block: bytes, size: int, tail: bytes) -> None:
        self._parts = [(head, len(head)), (block, size), (tail, len(tail))]
        self.total = len(head) + size + len(tail)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self.total + offset}[whence]
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        written = 0
        start = 0
        for data, size in self._parts:
            while written < len(view) and start <= self._pos < start + size:
                offset = (self._pos - start) % len(data)
                n = min(len(view) - written, len(data) - offset, start + size - self._pos)
                view[written : written + n] = data[offset : offset + n]
                written += n
                self._pos += n
            start += size
        return written


def measured(run: Any) -> tuple[Any, float, int]:
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, time.monotonic() - started, peak


def test_a_1_gb_line_is_skipped_in_bounded_memory_and_little_time() -> None:
    good = jsonl([GOOD_CHAT] * 10)
    huge = Repeating(good + b'{"text": "', b"a" * MIB, GIB, b'"}\n' + jsonl([GOOD_CHAT]))
    result, seconds, peak = measured(lambda: check_dataset(huge, filename="huge.jsonl"))  # type: ignore[arg-type]
    assert result.problems == [f"line 11: line is longer than the limit of {MIB} bytes"]
    assert result.n_examples == 11
    assert peak < 4 * MIB, f"peak allocation {peak} bytes"
    assert seconds < 3, f"{seconds:.1f} s"


def test_a_256_mb_json_array_item_is_skipped_in_bounded_memory() -> None:
    head = json_array([GOOD_CHAT] * 10)[:-2] + b',\n  {"text": "'
    huge = Repeating(head, b"a" * MIB, 256 * MIB, b'"},\n' + json.dumps(GOOD_CHAT).encode() + b"\n]")
    result, seconds, peak = measured(lambda: check_dataset(huge, filename="huge.json"))  # type: ignore[arg-type]
    assert result.problems == [f"item 11: item is longer than the limit of {MIB} bytes"]
    assert result.n_examples == 11
    assert peak < 8 * MIB, f"peak allocation {peak} bytes"
    assert seconds < 3, f"{seconds:.1f} s"


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_100k_deep_nesting_is_refused_quickly(name: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    data = (
        jsonl([GOOD_CHAT] * 10) + deep + b"\n"
        if name.endswith("l")
        else json_array([GOOD_CHAT] * 10)[:-1] + b"," + deep + b"]"
    )
    result, seconds, _ = measured(lambda: check(data, name))
    where = "line 11" if name.endswith("l") else "item 11"
    assert result.problems == [f"{where}: JSON is nested too deeply (more than 64 levels)"]
    assert seconds < 2


def test_nesting_just_over_the_limit_is_refused_even_where_json_could_parse_it() -> None:
    nested: Any = GOOD_CHAT
    for _ in range(70):
        nested = {"x": nested}
    data = jsonl([GOOD_CHAT] * 10 + [{"text": "a", "n": nested}])
    assert check(data).problems == ["line 11: JSON is nested too deeply (more than 64 levels)"]
    assert check(data, limits=DataLimits(max_depth=100)).problems == [
        "line 11: a text example, but the file holds chat examples (detected from line 1); a file must hold a single format"
    ]


def write_gzip_bomb(path: Path, member_text: bytes, copies: int) -> None:
    """A multi-member gzip file: one member compressed once, written `copies` times (streaming, tiny)."""
    member = gzip.compress(member_text, compresslevel=9)
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(member)


def test_a_gzip_bomb_of_text_is_stopped_by_the_ratio(tmp_path: Path) -> None:
    line = json.dumps({"text": "a" * 10_000}).encode() + b"\n"
    path = tmp_path / "bomb.jsonl.gz"
    write_gzip_bomb(path, line * 100, copies=1000)  # ~1 GB of text in ~2 MB
    assert path.stat().st_size < 4 * MIB
    with open(path, "rb") as f:
        result, seconds, peak = measured(lambda: check_dataset(f, filename="bomb.jsonl.gz"))
    assert result.problems == [
        "the file expands more than 200 times when decompressed, like a compression bomb; upload it uncompressed"
    ]
    assert seconds < 3 and peak < 8 * MIB


def test_a_gzip_bomb_of_zeros_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "zeros.gz"
    write_gzip_bomb(path, b"\0" * MIB, copies=1024)  # 1 GiB of zeros in ~1 MB
    with open(path, "rb") as f:
        result, seconds, peak = measured(lambda: check_dataset(f, filename="zeros.gz"))
    assert result.problems == [
        "the file holds binary data, not text (a NUL byte at byte 0); upload UTF-8 text or Parquet"
    ]
    assert seconds < 1 and peak < 2 * MIB


def test_decompressed_bytes_are_capped_whatever_the_ratio() -> None:
    data = gzip.compress(jsonl([{"text": f"line {i} " + "x" * (i % 97)} for i in range(40_000)]))
    result = check(data, "big.jsonl.gz", limits=DataLimits(max_decompressed_bytes=MIB))
    assert result.problems[-1] == "the file decompresses to more than the limit of 1 MiB"
    assert result.total_problems == 1


def test_a_csv_with_10000_columns_is_refused() -> None:
    header = ",".join(f"c{i}" for i in range(10_000)).encode() + b"\n"
    result, seconds, _ = measured(lambda: check(header + b"1," * 9_999 + b"1\n", "wide.csv"))
    assert result.problems == ["the header has 10000 columns; at most 256 are allowed"]
    assert seconds < 1


def test_huge_csv_fields_are_capped() -> None:
    data = b"text,label\n" + b"".join(f"t{i},1\n".encode() for i in range(10)) + b'"' + b"x" * 5000 + b'",1\n'
    result = check(data, "wide.csv", limits=DataLimits(max_field_bytes=1000))
    assert result.problems == ["row 11: text: longer than the limit of 1000 bytes"]


def test_an_unclosed_csv_quote_stops_at_the_row_limit_not_the_end_of_the_file() -> None:
    huge = Repeating(b'text,label\n"opened', b"more text, 1\n" * 1000, 64 * MIB, b"")
    result, _, peak = measured(lambda: check_dataset(huge, filename="quote.csv"))  # type: ignore[arg-type]
    assert result.problems == [
        f'row 1: a quoted field runs on for more than {MIB} bytes (is a closing " missing?)'
    ]
    assert 0 < huge.tell() < 4 * MIB and peak < 8 * MIB  # read a little past the limit, not the 64 MiB
