"""The rules of one chat example (OpenAI's `messages` format), in words a user can act on.

Every chat-like format is converted to this form and checked by these rules (shared.data.formats).
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call"}
MAX_PROBLEMS_SHOWN = 20


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
