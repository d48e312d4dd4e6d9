"""The chat rules of shared/data/file_validation.py, applied to uploads through shared.data.formats.

Hostile files (binary data, huge lines, deep nesting, bombs) are covered in test_data_formats.py.

Each failure mode has its own test asserting the exact words a user sees, prefixed by the line.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from shared.data.file_validation import chat_example_problem
from shared.data.formats import DataLimits, DatasetCheck, check_dataset

MIB = 1 << 20


def example(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = example(("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."))


def line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


def good_lines(n: int = 10) -> bytes:
    return line(GOOD) * n


def validate(data: bytes, *, chunk_size: int | None = None, max_line_bytes: int = MIB) -> DatasetCheck:
    """Chat JSONL through the upload validation (shared.data.formats), as the API runs it."""
    return check_dataset(
        io.BytesIO(data), filename="train.jsonl", limits=DataLimits(max_line_bytes=max_line_bytes)
    )


def problems_after_ten_good_lines(bad: bytes) -> list[str]:
    """The problems of a file with ten valid examples followed by `bad` on line 11."""
    result = validate(good_lines(10) + bad)
    assert result.n_examples == 10
    return result.problems


def test_a_valid_file_passes_with_a_summary_of_its_examples() -> None:
    result = validate(good_lines(12))
    assert result.ok
    assert (result.format, result.n_examples, result.problems, result.total_problems) == ("chat", 12, [], 0)
    assert result.summary() == "12 chat examples"


# -- one test per failure mode ------------------------------------------------------------------


def test_invalid_json_reports_the_line_and_column() -> None:
    assert problems_after_ten_good_lines(b'{"messages": [],}\n') == [
        "line 11: invalid JSON: Expecting property name enclosed in double quotes at column 17"
    ]


def test_a_line_that_is_not_an_object_is_refused() -> None:
    assert problems_after_ten_good_lines(b'[{"role": "user"}]\n') == [
        "line 11: expected a JSON object, got an array"
    ]


@pytest.mark.parametrize(
    ("value", "noun"),
    [("hello", "a string"), (3, "a number"), (2.5, "a number"), (True, "a boolean"), (None, "null")],
)
def test_the_wrong_json_type_is_named(value: Any, noun: str) -> None:
    assert chat_example_problem(value) == f"expected a JSON object, got {noun}"


def test_a_line_of_another_format_is_refused_naming_both_formats() -> None:
    assert problems_after_ten_good_lines(line({"prompt": "a", "completion": "b"})) == [
        "line 11: a prompt_completion example, but the file holds chat examples (detected from line 1); "
        "a file must hold a single format"
    ]


@pytest.mark.parametrize("messages", [[], {}, "hi", None])
def test_messages_must_be_a_non_empty_list(messages: Any) -> None:
    assert problems_after_ten_good_lines(line({"messages": messages})) == [
        'line 11: "messages" must be a non-empty list'
    ]


def test_a_message_that_is_not_an_object_is_refused() -> None:
    assert chat_example_problem({"messages": [{"role": "user", "content": "a"}, "b"]}) == (
        "messages[1]: expected an object, got a string"
    )


def test_an_unknown_message_key_is_named() -> None:
    bad = {"messages": [{"role": "user", "text": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert problems_after_ten_good_lines(line(bad)) == ["line 11: messages[0]: unrecognized key 'text'"]


def test_a_message_without_a_role_is_refused() -> None:
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"content": "Hello"}]}
    assert problems_after_ten_good_lines(line(bad)) == ['line 11: messages[1]: missing "role"']


def test_an_unknown_role_is_quoted_with_the_allowed_roles() -> None:
    bad = example(("system", "s"), ("user", "Hi"), ("assitant", "Hello"))
    result = validate(good_lines(13) + line(bad))
    assert result.problems == [
        'line 14: messages[2].role: "assitant" is not one of system, user, assistant, tool'
    ]


@pytest.mark.parametrize("content", ["missing", None, 42, ["a", "b"]])
def test_content_must_be_present_and_a_string(content: Any) -> None:
    message: dict[str, Any] = {"role": "user"}
    if content != "missing":
        message["content"] = content
    bad = {"messages": [message, {"role": "assistant", "content": "Hello"}]}
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: messages[0].content: missing or not a string"
    ]


def test_an_assistant_message_without_tool_calls_still_needs_content() -> None:
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}
    assert chat_example_problem(bad) == "messages[1].content: missing or not a string"


def test_only_assistant_messages_may_carry_a_weight() -> None:
    bad = {
        "messages": [
            {"role": "user", "content": "Hi", "weight": 1},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: messages[0].weight: only assistant messages may carry a weight"
    ]


@pytest.mark.parametrize("weight", [2, -1, 0.5, True, False, "1", None])
def test_a_weight_must_be_0_or_1(weight: Any) -> None:
    bad = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": weight},
        ]
    }
    assert problems_after_ten_good_lines(line(bad)) == ["line 11: messages[1].weight: must be 0 or 1"]


@pytest.mark.parametrize("weight", [0, 1])
def test_weights_0_and_1_are_accepted_on_assistant_messages(weight: int) -> None:
    ok = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": weight},
        ]
    }
    assert chat_example_problem(ok) is None


def test_a_system_message_may_only_come_first() -> None:
    bad = example(("user", "Hi"), ("system", "Be terse."), ("assistant", "Hello"))
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: messages[1].role: a system message may only come first"
    ]


def test_two_user_turns_in_a_row_are_refused() -> None:
    bad = example(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Hello"))
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: messages[1].role: two user messages in a row; user and assistant turns must alternate"
    ]


def test_two_assistant_turns_in_a_row_are_refused() -> None:
    bad = example(("user", "Hi"), ("assistant", "Hello"), ("assistant", "Hello again"))
    assert chat_example_problem(bad) == (
        "messages[2].role: two assistant messages in a row; user and assistant turns must alternate"
    )


def test_an_assistant_message_first_is_refused() -> None:
    bad = example(("assistant", "Hello"), ("user", "Hi"), ("assistant", "Bye"))
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: messages[0].role: an assistant message must follow a user or tool message"
    ]


def test_an_assistant_message_right_after_the_system_message_is_refused() -> None:
    bad = example(("system", "Be terse."), ("assistant", "Hello"))
    assert chat_example_problem(bad) == (
        "messages[1].role: an assistant message must follow a user or tool message"
    )


def test_an_example_without_an_assistant_message_is_refused() -> None:
    bad = example(("system", "Be terse."), ("user", "Hi"))
    assert problems_after_ten_good_lines(line(bad)) == [
        "line 11: no assistant message: every example needs at least one assistant turn to learn from"
    ]


def test_a_line_longer_than_the_limit_is_refused_and_the_next_line_is_still_checked() -> None:
    data = good_lines(10) + b"x" * 300 + b"\n" + b"[]\n"
    result = validate(data, max_line_bytes=200)
    assert result.problems == [
        "line 11: line is longer than the limit of 200 bytes",
        "line 12: expected a JSON object, got an array",
    ]
    assert result.n_examples == 10


def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    body = json.dumps(GOOD).encode()
    exact = body[:-1] + b" " * (200 - len(body)) + b"}"
    assert len(exact) == 200
    assert validate(good_lines(9) + exact + b"\n", max_line_bytes=200).ok
    assert validate(good_lines(9) + b" " + exact + b"\n", max_line_bytes=200).problems[0] == (
        "line 10: line is longer than the limit of 200 bytes"
    )


def test_fewer_than_ten_valid_examples_is_a_problem() -> None:
    result = validate(good_lines(9))
    assert not result.ok
    assert result.problems == ["the file has 9 valid examples; at least 10 are required"]
    assert result.summary() == "1 problem: the file has 9 valid examples; at least 10 are required"


def test_an_empty_file_has_no_format_and_too_few_examples() -> None:
    result = validate(b"")
    assert result.format is None
    assert result.problems == ["the file has 0 valid examples; at least 10 are required"]


def test_invalid_lines_do_not_count_towards_the_minimum() -> None:
    result = validate(good_lines(9) + b"[]\n")
    assert result.n_examples == 9
    assert result.problems == [
        "line 10: expected a JSON object, got an array",
        "the file has 9 valid examples; at least 10 are required",
    ]


def test_only_the_first_20_problems_are_listed_but_all_are_counted() -> None:
    result = validate(good_lines(10) + b"[]\n" * 25)
    assert result.total_problems == 25
    assert result.problems == [f"line {n}: expected a JSON object, got an array" for n in range(11, 31)]
    shown = "; ".join(result.problems)
    assert result.summary() == f"25 problems: {shown} (and 5 more)"


def test_blank_lines_are_ignored_but_keep_their_line_numbers() -> None:
    data = b"\n" + line(GOOD) * 5 + b"   \n\r\n" + line(GOOD) * 5 + b"\n\n[]\n"
    result = validate(data)
    assert result.n_examples == 10
    assert result.problems == ["line 16: expected a JSON object, got an array"]


def test_a_final_line_without_a_trailing_newline_counts() -> None:
    data = good_lines(9) + json.dumps(GOOD).encode()
    result = validate(data)
    assert result.ok
    assert result.n_examples == 10


def test_a_problem_on_a_final_line_without_newline_is_reported() -> None:
    assert validate(good_lines(10) + b"[]").problems == ["line 11: expected a JSON object, got an array"]


def test_assistant_tool_calls_without_content_are_accepted() -> None:
    tool_use = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
            {"role": "assistant", "content": "21 °C and sunny.", "weight": 1},
        ]
    }
    assert chat_example_problem(tool_use) is None
    with_null_content = json.loads(json.dumps(tool_use))
    with_null_content["messages"][1]["content"] = None
    assert chat_example_problem(with_null_content) is None
    assert validate(line(tool_use) * 10).ok
