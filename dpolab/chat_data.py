"""The conversational parts of a preference row: messages, tool calls, tools, template kwargs.

Row format (TRL's, for tool use):

    message     {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}
                An assistant message may carry "tool_calls" instead of (or beside) text; its
                "content" may then be missing, null or "".  Other keys ("name",
                "tool_call_id", "reasoning_content", ...) are passed to the template untouched.
    tool call   {"type": "function", "function": {"name": str, "arguments": {...}}}, "type"
                optional, "id" allowed; "arguments" a JSON object or a string holding one.
                The flat form {"name": str, "arguments": {...}} is accepted too (the
                templates of Qwen2.5 and Llama 3.1 read both).
    "tools"     a list of function schemas ({"type": "function", "function": {"name": ...}}
                or {"name": ...}), or that list as a JSON string; passed as the template's
                `tools`.
    "chat_template_kwargs"
                an object of extra template variables (e.g. {"enable_thinking": false}).

Multi-turn preference: the messages chosen and rejected share at their start belong to the
context, not to the completions (:func:`split_shared`); each completion is then every message
after the point of divergence, and must contain an assistant turn.

Functions here raise :class:`RowProblem` naming the field; dpolab.data prefixes FILE:ROW.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# apply_chat_template's own arguments: a template variable of these names would be ambiguous.
_RESERVED_KWARGS = ("conversation", "messages", "tools", "documents", "tokenize",
                    "add_generation_prompt", "continue_final_message", "return_dict",
                    "chat_template", "tokenizer_kwargs")


class RowProblem(ValueError):
    """One field of a row is malformed; the message names the field but not the place."""


def check_messages(value: list, key: str) -> list[dict]:
    """Every element of the non-empty list `value` is a valid message (see the module doc).
    Returns the messages without their null-valued keys: a table (Parquet, Dataset) gives
    every message every key seen in its column, null where absent, and a template that asks
    `message.name is defined` must not see a name "None"."""
    for i, msg in enumerate(value):
        at = f"field '{key}[{i}]'"
        if not isinstance(msg, dict):
            raise RowProblem(f"{at} must be a message {{'role', 'content'}}, got {_type(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            raise RowProblem(f"{at} has no 'role'")
        if role not in ROLES:
            raise RowProblem(f"{at} has role {role!r}; valid: {', '.join(ROLES)}")
        calls = msg.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise RowProblem(f"{at} has 'tool_calls' but role {role!r}; only assistant "
                                 "messages make tool calls")
            _check_tool_calls(calls, f"field '{key}[{i}].tool_calls")
            if content is None or content == "":
                continue              # a turn that only calls tools has no text
        if content is None:
            raise RowProblem(f"{at} has no 'content'")
        if not isinstance(content, str):
            raise RowProblem(f"{at} 'content' must be a string, got {_type(content)}")
        if not content.strip() and calls is None:
            raise RowProblem(f"{at} 'content' is empty")
    return [{k: v for k, v in msg.items() if v is not None} for msg in value]


def _check_tool_calls(calls: Any, at: str) -> None:
    """`at` is "field 'chosen[1].tool_calls" (the closing quote is added per message)."""
    if not isinstance(calls, list) or not calls:
        raise RowProblem(f"{at}' must be a non-empty list of tool calls, got "
                         f"{'an empty list' if isinstance(calls, list) else _type(calls)}")
    for j, call in enumerate(calls):
        here = f"{at}[{j}]'"
        if not isinstance(call, dict):
            raise RowProblem(f"{here} must be an object "
                             "{'type': 'function', 'function': {'name', 'arguments'}}, "
                             f"got {_type(call)}")
        if call.get("type", "function") != "function":
            raise RowProblem(f"{here} has type {call['type']!r}; valid: 'function'")
        fn = call.get("function", call)   # nested (OpenAI, TRL) or flat form
        if not isinstance(fn, dict):
            raise RowProblem(f"{here} 'function' must be an object, got {_type(fn)}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(f"{here} has no function 'name' (a non-empty string)")
        args = fn.get("arguments", _MISSING)
        if args is _MISSING or args is None:
            raise RowProblem(f"{here} has no 'arguments' (use {{}} for none)")
        if isinstance(args, str):
            args = _decoded(args, f"{here} 'arguments'")
        if not isinstance(args, dict):
            raise RowProblem(f"{here} 'arguments' must be a JSON object, got {_type(args)}")


def _decoded(text: str, what: str) -> Any:
    """A value TRL accepts as JSON text (tool-call arguments, the tools column), decoded."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RowProblem(f"{what} is a string but not valid JSON: {err.msg} "
                         f"(column {err.colno})") from None


def check_tools(value: Any) -> list[dict] | None:
    """The "tools" column: None when absent/null, else a list of function schemas (a JSON
    string holding one is decoded, as TRL does)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _decoded(value, "field 'tools'")
    if not isinstance(value, list):
        raise RowProblem(f"field 'tools' must be a list of function schemas, got {_type(value)}")
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowProblem(f"field 'tools[{i}]' must be a function schema "
                             "{'type': 'function', 'function': {'name': ..., 'parameters': ...}}"
                             f", got {json.dumps(tool)[:80] if isinstance(tool, dict) else _type(tool)}")
    return value or None      # [] renders like no tools (some templates print a header for [])


def check_template_kwargs(value: Any, field: str = "field 'chat_template_kwargs'") -> dict | None:
    """Extra chat-template variables: None when absent/null, else an object whose keys are
    not apply_chat_template's own arguments."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RowProblem(f"{field} must be an object of template variables, got {_type(value)}")
    clash = sorted(k for k in value if k in _RESERVED_KWARGS)
    if clash:
        raise RowProblem(f"{field} may not set {', '.join(clash)}: "
                         f"{'the tools column gives tools; ' if 'tools' in clash else ''}"
                         "dpolab sets the others itself")
    return value


def split_shared(prompt: list[dict], chosen: list[dict],
                 rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Move the messages chosen and rejected share at their start into the prompt, and check
    that each completion ends with an assistant turn.

    Shared leading turns are context: both dialogues condition on them, so the preference
    is over what follows the divergence, and scoring them would add equal log-probs to both
    sides of a margin only under the plain sum (not under averaging, SFT or their reference
    terms)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if n == len(msgs):
            raise RowProblem(f"field '{key}' has no message after the part it shares with "
                             f"the other completion (its first {n} messages)")
        if msgs[-1]["role"] != "assistant":
            after = ("" if any(m["role"] == "assistant" for m in msgs[n:]) else
                     f"; no assistant turn follows the point where chosen and rejected "
                     f"diverge ({key}[{n}]), so there is nothing to prefer")
            raise RowProblem(f"field '{key}' must end with an assistant message, got role "
                             f"'{msgs[-1]['role']}'{after}")
    return prompt + chosen[:n], chosen[n:], rejected[n:]


_MISSING = object()


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
