"""Validation that sees every input of a node and reports once.

ComfyUI repeats a ``validate_inputs`` message once per parameter the method names (each prefixed with that
input's name), so each RIDFR node's ``validate_inputs`` names a single input and reads the node's other
values from the prompt being validated: an ``on_prompt`` handler keeps the last prompts by prompt id (it
gives a prompt without an id one, as ComfyUI would), and ComfyUI runs ``validate_inputs`` inside the
execution context of that prompt id and node id.

Combo values: ComfyUI checks them against their options itself, except for the input ``validate_inputs`` names,
since its December 2025 releases (Comfy-Org/ComfyUI#11345, the change that also made ``io.DynamicCombo``
public); v0.3.x checks none of a V3 node's combos. A node checks a plain choice itself only where ComfyUI does
not (:func:`checked_by_comfyui`), so that no problem is reported twice.
"""

from __future__ import annotations

import sys
import uuid
from collections import OrderedDict

from comfy_api.latest import io

KEPT_PROMPTS = 16
_submitted: OrderedDict[str, dict] = OrderedDict()
_node_types: set[str] = set()
COMFYUI_CHECKS_COMBOS = hasattr(io, "DynamicCombo")


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


def checked_by_comfyui(combos: tuple[str, ...], named: str) -> set[str]:
    """Those of a node's plain-choice ``combos`` whose wrong values ComfyUI reports itself (all but ``named``,
    the input its ``validate_inputs`` names, on ComfyUI versions that check combos)."""
    return {combo for combo in combos if combo != named} if COMFYUI_CHECKS_COMBOS else set()


def upstream_inputs(input_name: str, class_type: str) -> dict | None:
    """The widget values of the ``class_type`` node whose output feeds ``input_name`` of the node being validated
    (e.g. the Load RIDFR behind a ``ridfr`` input), or None when it is not linked to such a node here."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    prompt = _submitted.get(context.prompt_id, {}) if context else {}
    link = prompt.get(context.node_id, {}).get("inputs", {}).get(input_name) if context else None
    source = prompt.get(str(link[0])) if isinstance(link, list) and link else None
    if not isinstance(source, dict) or source.get("class_type") != class_type:
        return None
    return {name: None if isinstance(value, list) else value for name, value in source.get("inputs", {}).items()}
