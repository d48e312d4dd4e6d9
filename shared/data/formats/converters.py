"""Dataset formats, each record converted into one internal form (`Example`) that the trainer consumes.

Formats (`detect_format`: from the keys of the first record that has a known shape, or forced with
`format=`), one per file:

| format            | a record                                                        | becomes (kind)  |
|-------------------|-----------------------------------------------------------------|-----------------|
| chat              | `messages` [{role, content, weight?, ...}], `tools`?            | chat            |
| prompt_completion | `prompt`, `completion`                                          | chat: user, assistant |
| alpaca            | `instruction`, `input`?, `output`, `system`?, `history`?        | chat: [system], [history], user, assistant |
| sharegpt          | `conversations` [{from, value}], `system`?, `tools`?            | chat (human→user, gpt→assistant, system, function_call→assistant, observation→tool) |
| text              | `text`                                                          | text            |
| classification    | `text`, `label` (string or integer)                             | classification  |
| preference        | `input` {messages}, `preferred_output`, `non_preferred_output` (OpenAI DPO); `prompt`, `chosen`, `rejected` (strings or message lists); `conversations` + `chosen`/`rejected` {from, value} (LLaMA-Factory) | preference: prompt messages, chosen, rejected |

Every converted chat example satisfies `file_validation.chat_example_problem`, and so does each of a
preference example's prompt + chosen and prompt + rejected conversations. Columns or keys a format does
not use are kept in `Example.fields`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from shared.data.file_validation import chat_example_problem
from shared.data.formats.containers import (
    _HEAD,
    DataFormatError,
    DataLimits,
    _BoundedGunzip,
    _Chain,
    _Columns,
    _csv_records,
    _deep_candidate,
    _Fatal,
    _gunzip_head,
    _Issue,
    _issue,
    _json_error,
    _JsonArray,
    _jsonl_records,
    _parquet_records,
    _read_up_to,
    _Readable,
    _Record,
    _text_problem,
    _UnknownContainer,
    detect_container,
)

FORMATS: tuple[str, ...] = (
    "chat",
    "prompt_completion",
    "text",
    "alpaca",
    "sharegpt",
    "preference",
    "classification",
)
# The kinds of examples the formats convert into; a processed file's `task` is its kind, and each training
# method names the kind it trains on (shared.methods).
DataKind = Literal["chat", "text", "preference", "classification"]
# What each format trains: the kind of the examples it converts into.
TASKS: dict[str, DataKind] = {
    "chat": "chat",
    "prompt_completion": "chat",
    "alpaca": "chat",
    "sharegpt": "chat",
    "text": "text",
    "preference": "preference",
    "classification": "classification",
}
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass
class Example:
    """One training example, whatever the format it came in."""

    kind: DataKind
    source: str  # "line 3" / "item 3" / "row 3": where it is in the file
    messages: list[dict[str, Any]] | None = None  # chat; for preference: the prompt messages
    text: str | None = None  # text and classification
    chosen: list[dict[str, Any]] | None = None  # preference: the preferred assistant message(s)
    rejected: list[dict[str, Any]] | None = None
    label: str | None = None  # classification (always a string)
    tools: list[dict[str, Any]] | None = None  # chat and preference: OpenAI-style function tools
    fields: dict[str, Any] = field(default_factory=dict)  # other keys or columns, e.g. "group", "id"

    def to_record(self) -> dict[str, Any]:
        """The example as one line of Tunery's canonical JSONL (OpenAI's shapes where OpenAI has one)."""
        if self.kind == "chat":
            record: dict[str, Any] = {"messages": self.messages}
        elif self.kind == "preference":
            prompt: dict[str, Any] = {"messages": self.messages}
            if self.tools:
                prompt["tools"] = self.tools
            return {"input": prompt, "preferred_output": self.chosen, "non_preferred_output": self.rejected}
        elif self.kind == "classification":
            return {"text": self.text, "label": self.label}
        else:
            return {"text": self.text}
        if self.tools:
            record["tools"] = self.tools
        return record


def read_examples(
    f: BinaryIO,
    *,
    filename: str,
    format: str | None = None,
    limits: DataLimits = DataLimits(),
) -> Iterator[Example]:
    """The converted examples of a dataset, in file order; raises DataFormatError at the first bad record.

    A file that `check_dataset` passed never raises (the minimum number of examples is not re-checked).
    """
    reader = _Reader(f, filename=filename, format=format, limits=limits)  # checks `format` at once
    return _raising(reader.events())


def _raising(events: Iterator[Example | _Issue]) -> Iterator[Example]:
    for event in events:
        if isinstance(event, _Issue):
            raise DataFormatError(event.text)
        yield event


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in record:
        return "chat"
    if "input" in record and ("preferred_output" in record or "non_preferred_output" in record):
        return "preference"
    if "conversations" in record:
        return "preference" if "chosen" in record or "rejected" in record else "sharegpt"
    if "prompt" in record and ("chosen" in record or "rejected" in record):
        return "preference"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "classification" if "label" in record else "text"
    return None


# -- formats: one record → one Example --------------------------------------------------------------


class _Bad(Exception):
    """A record's problem, in the words of `chat_example_problem`: `field: reason`."""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _string(
    record: Mapping[str, Any], key: str, *, required: bool = True, nonblank: bool = False
) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise _Bad(f'missing "{key}"')
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key}: must be a string, got {_type_name(value)}")
    if nonblank and not value.strip():
        raise _Bad(f"{key}: empty")
    return value


def _rest(record: Mapping[str, Any], *used: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in used}


def _tools(value: Any, key: str = "tools") -> list[dict[str, Any]] | None:
    """OpenAI-style tools from a list (or a JSON string, as LLaMA-Factory stores them) of function schemas."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Bad(f"{key}: not valid JSON ({_json_error(exc)})") from None
    if not isinstance(value, list):
        raise _Bad(f"{key}: must be a list of tools, got {_type_name(value)}")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _Bad(f"{key}[{i}]: expected an object, got {_type_name(tool)}")
        if "type" in tool:
            tools.append(tool)
        elif "name" in tool:
            tools.append({"type": "function", "function": tool})  # a bare function schema
        else:
            raise _Bad(
                f'{key}[{i}]: expected a tool ({{"type": "function", "function": {{...}}}}) or a function schema with a "name"'
            )
    return tools or None


# The source of each converted message, for problems: (path, how its fields are named there) where the
# naming is None for a message made from a plain string field.
_Paths = list[tuple[str, dict[str, str] | None]]
_SAME: dict[str, str] = {}
_SHAREGPT_FIELDS = {".role": ".from", ".content": ".value"}
_MESSAGE_REF = re.compile(r"messages\[(\d+)\](\.\w+)?")


def _check_chat(messages: list[dict[str, Any]], paths: _Paths) -> None:
    problem = chat_example_problem({"messages": messages})
    if problem is None:
        return
    match = _MESSAGE_REF.match(problem)
    if match is not None:
        path, naming = paths[int(match[1])]
        suffix = "" if naming is None else naming.get(match[2] or "", match[2] or "")
        problem = path + suffix + problem[match.end() :]
    raise _Bad(problem)


def _chat(record: Mapping[str, Any], source: str) -> Example:
    problem = chat_example_problem(record)
    if problem:
        raise _Bad(problem)
    return Example(
        kind="chat",
        source=source,
        messages=[dict(message) for message in record["messages"]],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "messages", "tools"),
    )


def _prompt_completion(record: Mapping[str, Any], source: str) -> Example:
    prompt = _string(record, "prompt")
    completion = _string(record, "completion")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Example(
        kind="chat", source=source, messages=messages, fields=_rest(record, "prompt", "completion")
    )


def _text(record: Mapping[str, Any], source: str) -> Example:
    text = _string(record, "text", nonblank=True)
    return Example(kind="text", source=source, text=text, fields=_rest(record, "text"))


def _classification(record: Mapping[str, Any], source: str) -> Example:
    text = _string(record, "text", nonblank=True)
    label = record.get("label")
    if label is None:
        raise _Bad('missing "label"')
    if isinstance(label, bool):
        label = "true" if label else "false"
    elif isinstance(label, float) and label.is_integer():
        label = str(int(label))
    elif isinstance(label, int):
        label = str(label)
    elif not isinstance(label, str):
        raise _Bad(f"label: must be a string or an integer, got {_type_name(label)}")
    if not label.strip():
        raise _Bad("label: empty")
    return Example(
        kind="classification", source=source, text=text, label=label, fields=_rest(record, "text", "label")
    )


def _alpaca(record: Mapping[str, Any], source: str) -> Example:
    instruction = _string(record, "instruction", nonblank=True)
    extra = _string(record, "input", required=False)
    output = _string(record, "output")
    system = _string(record, "system", required=False)
    messages: list[dict[str, Any]] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _Bad(f"history: must be a list of [instruction, response] pairs, got {_type_name(history)}")
        for i, pair in enumerate(history):
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
            ):
                raise _Bad(f"history[{i}]: must be a pair of strings [instruction, response]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(
        kind="chat",
        source=source,
        messages=messages,
        fields=_rest(record, "instruction", "input", "output", "system", "history"),
    )


def _sharegpt_turns(turns: Any, key: str) -> tuple[list[dict[str, Any]], _Paths]:
    if not isinstance(turns, list) or not turns:
        raise _Bad(f'"{key}" must be a non-empty list of {{"from", "value"}} objects')
    messages: list[dict[str, Any]] = []
    paths: _Paths = []
    for i, turn in enumerate(turns):
        messages.append(_sharegpt_turn(turn, f"{key}[{i}]"))
        paths.append((f"{key}[{i}]", _SHAREGPT_FIELDS))
    return messages, paths


def _sharegpt_turn(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise _Bad(f"{where}: expected an object, got {_type_name(turn)}")
    if "from" not in turn:
        raise _Bad(f'{where}: missing "from"')
    speaker = turn["from"]
    if speaker not in SHAREGPT_ROLES:
        raise _Bad(f"{where}.from: {json.dumps(speaker)} is not one of {', '.join(SHAREGPT_ROLES)}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise _Bad(f"{where}.value: missing or not a string")
    message: dict[str, Any] = {"role": SHAREGPT_ROLES[speaker], "content": value}
    if "weight" in turn:
        message["weight"] = turn["weight"]
    return message


def _sharegpt_prefix(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], _Paths]:
    system = _string(record, "system", required=False)
    if system and system.strip():
        return [{"role": "system", "content": system}], [("system", None)]
    return [], []


def _sharegpt(record: Mapping[str, Any], source: str) -> Example:
    if "conversations" not in record:
        raise _Bad('missing "conversations" (a list of {"from", "value"} objects)')
    messages, paths = _sharegpt_prefix(record)
    turns, turn_paths = _sharegpt_turns(record["conversations"], "conversations")
    messages += turns
    paths += turn_paths
    _check_chat(messages, paths)
    return Example(
        kind="chat",
        source=source,
        messages=messages,
        tools=_tools(record.get("tools")),
        fields=_rest(record, "conversations", "system", "tools"),
    )


def _preference(record: Mapping[str, Any], source: str) -> Example:
    if "input" in record or "preferred_output" in record or "non_preferred_output" in record:
        return _preference_openai(record, source)
    if "conversations" in record:
        return _preference_sharegpt(record, source)
    return _preference_prompt(record, source)


def _check_pair(
    prompt: list[dict[str, Any]], paths: _Paths, replies: list[tuple[list[dict[str, Any]], _Paths]]
) -> None:
    for reply, reply_paths in replies:
        for message, (path, naming) in zip(reply, reply_paths, strict=True):
            if isinstance(message, dict) and message.get("role") not in (None, "assistant"):
                role = ".from" if naming is _SHAREGPT_FIELDS else ".role"
                raise _Bad(
                    f"{path}{role if naming is not None else ''}: the reply must be an assistant message"
                )
        _check_chat(prompt + reply, paths + reply_paths)


def _preference_openai(record: Mapping[str, Any], source: str) -> Example:
    prompt = record.get("input")
    if prompt is None:
        raise _Bad('missing "input" (an object with the prompt "messages")')
    if not isinstance(prompt, dict):
        raise _Bad(f'input: must be an object with "messages", got {_type_name(prompt)}')
    messages = prompt.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad('input.messages: must be a non-empty list of {"role", "content"} objects')
    replies = []
    for key, what in (("preferred_output", "preferred"), ("non_preferred_output", "rejected")):
        reply = record.get(key)
        if reply is None:
            raise _Bad(f'missing "{key}" (a list holding the {what} assistant message)')
        if not isinstance(reply, list) or not reply:
            raise _Bad(f'"{key}" must be a non-empty list of assistant messages')
        replies.append((reply, [(f"{key}[{i}]", _SAME) for i in range(len(reply))]))
    paths: _Paths = [(f"input.messages[{i}]", _SAME) for i in range(len(messages))]
    _check_pair(messages, paths, replies)
    fields = _rest(record, "input", "preferred_output", "non_preferred_output")
    fields.update(_rest(prompt, "messages", "tools"))
    return Example(
        kind="preference",
        source=source,
        messages=[dict(m) for m in messages],
        chosen=[dict(m) for m in replies[0][0]],
        rejected=[dict(m) for m in replies[1][0]],
        tools=_tools(prompt.get("tools"), "input.tools"),
        fields=fields,
    )


def _reply(record: Mapping[str, Any], key: str, sharegpt: bool) -> tuple[list[dict[str, Any]], _Paths]:
    """A chosen or rejected reply: a string, a list of messages, or ({from, value} objects in sharegpt)."""
    value = record.get(key)
    if value is None:
        raise _Bad(f'missing "{key}" (the {key} reply)')
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], [(key, None)]
    if sharegpt and isinstance(value, dict):
        return [_sharegpt_turn(value, key)], [(key, _SHAREGPT_FIELDS)]
    if isinstance(value, list) and value:
        if sharegpt:
            return _sharegpt_turns(value, key)
        return [m if not isinstance(m, dict) else dict(m) for m in value], [
            (f"{key}[{i}]", _SAME) for i in range(len(value))
        ]
    shape = (
        'a string or a {"from", "value"} object' if sharegpt else "a string or a non-empty list of messages"
    )
    raise _Bad(f"{key}: must be {shape}, got {_type_name(value)}")


def _preference_sharegpt(record: Mapping[str, Any], source: str) -> Example:
    messages, paths = _sharegpt_prefix(record)
    turns, turn_paths = _sharegpt_turns(record["conversations"], "conversations")
    messages += turns
    paths += turn_paths
    chosen = _reply(record, "chosen", sharegpt=True)
    rejected = _reply(record, "rejected", sharegpt=True)
    _check_pair(messages, paths, [chosen, rejected])
    return Example(
        kind="preference",
        source=source,
        messages=messages,
        chosen=chosen[0],
        rejected=rejected[0],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "conversations", "system", "tools", "chosen", "rejected"),
    )


def _preference_prompt(record: Mapping[str, Any], source: str) -> Example:
    prompt = record.get("prompt")
    if prompt is None:
        raise _Bad('missing "prompt"')
    messages, paths = _sharegpt_prefix(record)
    if isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
        paths.append(("prompt", None))
    elif isinstance(prompt, list) and prompt:
        messages += [m if not isinstance(m, dict) else dict(m) for m in prompt]
        paths += [(f"prompt[{i}]", _SAME) for i in range(len(prompt))]
    else:
        raise _Bad(f"prompt: must be a string or a non-empty list of messages, got {_type_name(prompt)}")
    chosen = _reply(record, "chosen", sharegpt=False)
    rejected = _reply(record, "rejected", sharegpt=False)
    _check_pair(messages, paths, [chosen, rejected])
    return Example(
        kind="preference",
        source=source,
        messages=messages,
        chosen=chosen[0],
        rejected=rejected[0],
        tools=_tools(record.get("tools")),
        fields=_rest(record, "prompt", "system", "tools", "chosen", "rejected"),
    )


_CONVERTERS = {
    "chat": _chat,
    "prompt_completion": _prompt_completion,
    "text": _text,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "preference": _preference,
    "classification": _classification,
}
# A record detected as the second format may be an incomplete one of the first: let the file's format
# name the missing key ('missing "label"') rather than call it another format.
_INCOMPLETE_OF = {("classification", "text"), ("preference", "sharegpt")}
_KEYS_HINT = (
    '"messages", "prompt" + "completion", "text" (+ "label"), "instruction" + "output", "conversations", '
    '"prompt" + "chosen" + "rejected", or "input" + "preferred_output" + "non_preferred_output"'
)
# Columns that hold JSON in a CSV file (the others are strings).
_CSV_JSON_COLUMNS = frozenset(
    {"messages", "conversations", "tools", "preferred_output", "non_preferred_output", "history"}
)


def _required_columns(format: str, columns: list[str]) -> tuple[str, ...]:
    if format == "preference":
        if "input" in columns or "preferred_output" in columns:
            return ("input", "preferred_output", "non_preferred_output")
        if "conversations" in columns:
            return ("conversations", "chosen", "rejected")
        return ("prompt", "chosen", "rejected")
    return {
        "chat": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "text": ("text",),
        "classification": ("text", "label"),
        "alpaca": ("instruction", "output"),
        "sharegpt": ("conversations",),
    }[format]


class _Reader:
    """One pass over a dataset: yields its Examples and its problems (`_Issue`), in file order."""

    def __init__(self, f: BinaryIO, *, filename: str, format: str | None, limits: DataLimits) -> None:
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        self._f = f
        self._filename = filename
        self._limits = limits
        self._forced = format is not None
        self.format = format
        self.container: str | None = None
        self._detected_from: str | None = None
        self._json_cells: frozenset[str] = frozenset()
        self._tabular = False  # CSV and Parquet: the columns fix the format for every row

    def events(self) -> Iterator[Example | _Issue]:
        for item in self._records():
            if isinstance(item, _Issue):
                yield item
                if item.fatal:
                    return
            elif isinstance(item, _Columns):
                problem = self._columns(item)
                if problem is not None:
                    yield _Issue(problem, fatal=True)
                    return
            else:
                yield self._convert(item)

    def _records(self) -> Iterator[_Record | _Issue | _Columns]:
        limits = self._limits
        raw_head = _read_up_to(self._f, _HEAD)
        try:
            self.container = detect_container(self._filename, raw_head)
        except _UnknownContainer as exc:  # binary data, likely: say so rather than "cannot tell"
            text_problem = None
            if raw_head.startswith(b"\x1f\x8b"):
                with contextlib.suppress(DataFormatError):
                    inner = _gunzip_head(raw_head)
                    text_problem = _text_problem(inner, len(inner) < _HEAD)
            elif not raw_head.startswith(b"PAR1"):
                text_problem = _text_problem(raw_head, len(raw_head) < _HEAD)
            yield _Issue(text_problem or str(exc), fatal=True)
            return
        except DataFormatError as exc:
            yield _Issue(str(exc), fatal=True)
            return
        if self.container == "parquet":
            yield from _parquet_records(self._f, limits)
            return
        stream: _Readable = _Chain(raw_head, self._f)
        if self.container.endswith(".gz"):
            stream = _BoundedGunzip(stream, limits)
        try:
            head = _read_up_to(stream, _HEAD)
        except _Fatal as exc:
            yield _Issue(str(exc), fatal=True)
            return
        problem = _text_problem(head, len(head) < _HEAD)
        if problem is not None:
            yield _Issue(problem, fatal=True)
            return
        if head.startswith(codecs.BOM_UTF8):
            head = head[3:]
        stream = _Chain(head, stream)
        base = self.container.removesuffix(".gz")
        try:
            if base == "jsonl":
                yield from _jsonl_records(stream, limits)
            elif base == "json":
                yield from _JsonArray(stream, limits).records()
            else:
                yield from _csv_records(stream, limits)
        except _Fatal as exc:  # from the decompressor, under any reader
            yield _Issue(str(exc), fatal=True)

    def _columns(self, columns: _Columns) -> str | None:
        """Tabular files: the format from the column names, and the columns it needs."""
        names = columns.names
        self._tabular = True
        if self.format is None:
            self.format = detect_format(dict.fromkeys(names))
            if self.format is None:
                return f"no known format has the columns {_list(names)}; expected columns {_KEYS_HINT}"
            self._detected_from = columns.what
        for required in _required_columns(self.format, names):
            if required not in names:
                return f'{columns.what} has no "{required}" column (the columns are: {_list(names)})'
        if columns.what == "the header":
            cells = set(_CSV_JSON_COLUMNS)
            if "preferred_output" in names or "non_preferred_output" in names:
                cells.add("input")
            if "conversations" in names:
                cells |= {"chosen", "rejected"}
            self._json_cells = frozenset(cells & set(names))
        return None

    def _convert(self, record: _Record) -> Example | _Issue:
        source, value = record.source, record.value
        if not isinstance(value, dict):
            return _issue(source, f"expected a JSON object, got {_type_name(value)}")
        if self._json_cells:
            try:
                value = self._parse_cells(value)
            except _Bad as exc:
                return _issue(source, str(exc))
        if self.format is None:
            self.format = detect_format(value)
            if self.format is None:
                keys = _list(list(value)) if value else "none"
                return _issue(source, f"no known format has the keys {keys}; expected {_KEYS_HINT}")
            self._detected_from = source
        elif not (self._forced or self._tabular):
            kind = detect_format(value)
            if kind is not None and kind != self.format and (self.format, kind) not in _INCOMPLETE_OF:
                return _issue(
                    source,
                    f"a {kind} example, but the file holds {self.format} examples (detected from "
                    f"{self._detected_from}); a file must hold a single format",
                )
        try:
            return _CONVERTERS[self.format](value, source)
        except _Bad as exc:
            return _issue(source, str(exc))

    def _parse_cells(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        for name in self._json_cells:
            cell = row.get(name)
            if isinstance(cell, str):
                if not cell.strip():
                    row[name] = None
                    continue
                depth = self._limits.max_depth
                try:
                    row[name] = json.loads(cell)
                except RecursionError:
                    raise _Bad(f"{name}: JSON is nested too deeply (more than {depth} levels)") from None
                except ValueError as exc:
                    raise _Bad(f"{name}: not valid JSON ({_json_error(exc)})") from None
                if _deep_candidate(row[name], cell.count("[") + cell.count("{"), depth):
                    raise _Bad(f"{name}: JSON is nested too deeply (more than {depth} levels)")
        return row


def _list(names: list[str], at_most: int = 20) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")
