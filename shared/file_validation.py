"""Validation of uploaded training files, fed chunk by chunk in the same pass that stores them.

Memory stays bounded whatever the file holds: lines longer than the limit are skipped as they
stream, and only the first problems are kept (the rest are counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call"}
MIN_EXAMPLES = 10
MAX_PROBLEMS_SHOWN = 20


@dataclass
class ValidationResult:
    format: str | None
    n_examples: int
    problems: list[str]
    total_problems: int

    @property
    def ok(self) -> bool:
        return self.total_problems == 0

    def summary(self) -> str:
        if self.ok:
            return f"{self.n_examples} {self.format} examples"
        shown = "; ".join(self.problems)
        more = self.total_problems - len(self.problems)
        tail = f" (and {more} more)" if more > 0 else ""
        noun = "problem" if self.total_problems == 1 else "problems"
        return f"{self.total_problems} {noun}: {shown}{tail}"


@dataclass
class ChatJsonlValidator:
    """Checks OpenAI chat JSONL (`{"messages": [...]}` per line)."""

    max_line_bytes: int = 1024 * 1024
    _buffer: bytearray = field(default_factory=bytearray)
    _line_no: int = 0
    _skipping_long_line: bool = False
    _n_examples: int = 0
    _problems: list[str] = field(default_factory=list)
    _total: int = 0

    def feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            if not self._skipping_long_line:
                self._buffer += piece
                if len(self._buffer) > self.max_line_bytes:
                    self._problem(
                        self._line_no + 1, f"line is longer than the limit of {self.max_line_bytes} bytes"
                    )
                    self._buffer.clear()
                    self._skipping_long_line = True
            if newline < 0:
                return
            self._end_line()
            start = newline + 1

    def finish(self) -> ValidationResult:
        if self._buffer or self._skipping_long_line:
            self._end_line()
        if self._n_examples < MIN_EXAMPLES:
            self._problem(
                None, f"the file has {self._n_examples} valid examples; at least {MIN_EXAMPLES} are required"
            )
        return ValidationResult(
            format="chat" if self._n_examples else None,
            n_examples=self._n_examples,
            problems=self._problems,
            total_problems=self._total,
        )

    def _problem(self, line: int | None, message: str) -> None:
        self._total += 1
        if len(self._problems) < MAX_PROBLEMS_SHOWN:
            self._problems.append(f"line {line}: {message}" if line is not None else message)

    def _end_line(self) -> None:
        self._line_no += 1
        raw = bytes(self._buffer)
        self._buffer.clear()
        if self._skipping_long_line:
            self._skipping_long_line = False
            return
        if not raw.strip():
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._problem(self._line_no, f"not valid UTF-8 (byte {exc.start})")
            return
        try:
            example = json.loads(text)
        except RecursionError:
            self._problem(self._line_no, "JSON is nested too deeply")
            return
        except json.JSONDecodeError as exc:
            self._problem(self._line_no, f"invalid JSON: {exc.msg} at column {exc.colno}")
            return
        problem = chat_example_problem(example)
        if problem:
            self._problem(self._line_no, problem)
        else:
            self._n_examples += 1


def chat_example_problem(example: Any) -> str | None:
    """The first thing wrong with one chat example, or None; in the words a user can act on."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {_json_type(example)}"
    if "messages" not in example:
        return 'missing "messages" (a list of {"role", "content"} objects)'
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    previous = None
    has_assistant = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return f"{where}: expected an object, got {_json_type(message)}"
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            return f"{where}: unrecognized key {unknown[0]!r}"
        if "role" not in message:
            return f'{where}: missing "role"'
        role = message["role"]
        if role not in ROLES:
            return f"{where}.role: {json.dumps(role)} is not one of {', '.join(ROLES)}"
        content = message.get("content")
        tool_call_only = role == "assistant" and "tool_calls" in message
        if not tool_call_only and not isinstance(content, str):
            return f"{where}.content: missing or not a string"
        if "weight" in message:
            if role != "assistant":
                return f"{where}.weight: only assistant messages may carry a weight"
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                return f"{where}.weight: must be 0 or 1"
        if role == "system" and i != 0:
            return f"{where}.role: a system message may only come first"
        if role in ("user", "assistant") and role == previous:
            return f"{where}.role: two {role} messages in a row; user and assistant turns must alternate"
        if role == "assistant" and previous not in ("user", "tool"):
            return f"{where}.role: an assistant message must follow a user or tool message"
        if role != "system":
            previous = role
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        return "no assistant message: every example needs at least one assistant turn to learn from"
    return None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )
