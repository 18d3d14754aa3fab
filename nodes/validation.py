"""Validation that sees every input of a node and reports once.

ComfyUI repeats a ``validate_inputs`` message once per parameter the method names (each prefixed with that
input's name), so each RIDFR node's ``validate_inputs`` names a single input and reads the node's other
values from the prompt being validated: an ``on_prompt`` handler keeps the last prompts by prompt id (it
gives a prompt without an id one, as ComfyUI would), and ComfyUI runs ``validate_inputs`` inside the
execution context of that prompt id and node id.
"""

from __future__ import annotations

import sys
import uuid
from collections import OrderedDict

KEPT_PROMPTS = 16
_submitted: OrderedDict[str, dict] = OrderedDict()
_node_types: set[str] = set()


def prompt_server():
    """ComfyUI's running PromptServer, or None (ComfyUI imported as a library, e.g. in tests)."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def remember_prompt(json_data: dict) -> dict:
    """``on_prompt`` handler: keep prompts holding a RIDFR node, under their prompt id."""
    prompt = json_data.get("prompt")
    if isinstance(prompt, dict) and any(isinstance(node, dict) and node.get("class_type") in _node_types
                                        for node in prompt.values()):
        prompt_id = str(json_data.setdefault("prompt_id", str(uuid.uuid4())))
        _submitted[prompt_id] = prompt
        while len(_submitted) > KEPT_PROMPTS:
            _submitted.popitem(last=False)
    return json_data


def register(node_types) -> None:
    _node_types.update(node_types)
    server = prompt_server()
    if server is not None and remember_prompt not in server.on_prompt_handlers:
        server.add_on_prompt_handler(remember_prompt)


def node_inputs(**given) -> dict:
    """The widget values of the node being validated (linked inputs as None), updated with ``given`` (what
    ComfyUI passed); only ``given`` outside a prompt's validation (a direct call)."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    node = _submitted.get(context.prompt_id, {}).get(context.node_id) if context else None
    if not isinstance(node, dict):
        return dict(given)
    values = {name: None if isinstance(value, list) else value for name, value in node.get("inputs", {}).items()}
    return {**values, **given}
