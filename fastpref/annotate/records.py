"""Validation helpers for annotation input records (plain text or chat-message fields)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from fastpref.annotate.jsonl import RecordError
from fastpref.hf.data import check_messages as _check_messages

PromptLike = Union[str, List[Dict[str, str]]]


def check_messages(name: str, value: Any) -> List[Dict[str, str]]:
    """A non-empty list of ``{'role', 'content'}`` messages (the training data's check), else :class:`RecordError`."""
    return _check_messages(name, value, error=RecordError)


def get_prompt(record: Dict[str, Any], keys: Sequence[str] = ("prompt",)) -> PromptLike:
    """The prompt of a record: a string, or a list of chat messages with at least one user turn."""
    for key in keys:
        if key in record:
            value = record[key]
            if isinstance(value, str):
                return value
            messages = check_messages(key, value)
            if not any(m["role"] == "user" for m in messages):
                raise RecordError(f"{key!r}: the message list has no user turn")
            return messages
    raise RecordError(f"missing key {' / '.join(repr(k) for k in keys)}")


def response_text(name: str, value: Any) -> str:
    """A response given as a string, or as a message list holding one assistant turn (its content)."""
    if isinstance(value, str):
        if not value:
            raise RecordError(f"{name!r}: empty response")
        return value
    if isinstance(value, list):
        msgs = check_messages(name, value)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RecordError(f"{name!r}: a message-list response must be exactly one assistant turn")
        if not msgs[0]["content"]:
            raise RecordError(f"{name!r}: empty response")
        return msgs[0]["content"]
    raise RecordError(f"{name!r}: expected a string or a one-message list, got {type(value).__name__}")


def response_list(record: Dict[str, Any], keys: Sequence[str]) -> Optional[List[str]]:
    """The first of ``keys`` holding a list of responses (None when no key is present)."""
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, list):
                raise RecordError(f"{key!r}: expected a list of responses, got {type(value).__name__}")
            return [response_text(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return None


def query_text(prompt: PromptLike) -> str:
    """The last user message of a prompt (what a router or a judge reads as "the request")."""
    if isinstance(prompt, str):
        return prompt
    return [m for m in prompt if m["role"] == "user"][-1]["content"]


def transcript(prompt: PromptLike) -> str:
    """A prompt as plain text for a judge: the string itself, or ``Role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def as_response(prompt: PromptLike, text: str, original: Any = None) -> Any:
    """A response in the form ``fastpref train`` expects next to ``prompt``: a string for a string
    prompt, a one-assistant-message list for a conversational one."""
    if isinstance(original, list):
        return original
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": text}]
    return text


def extras(record: Dict[str, Any], known: Sequence[str]) -> Dict[str, Any]:
    """Input fields an annotator does not consume (ids, metadata), passed through to the output."""
    skip = set(known) | {"source_line"}
    return {k: v for k, v in record.items() if k not in skip}
