"""Workflows in ComfyUI's editor format, converted to the API format its executor and /prompt take.

The editor saves a graph (`nodes` with `widgets_values`, `links`); the executor wants `{id: {class_type,
inputs}}`. Converting needs each node's input definitions (what /object_info serves), because
`widgets_values` is a list in widget order. This follows the editor (frontend 1.27, graphToPrompt):
- a widget is an input of type INT, FLOAT, STRING, BOOLEAN or COMBO (a list of options) without forceInput;
- an INT named `seed`/`noise_seed`, or any input with `control_after_generate`, is followed in
  `widgets_values` by its "control after generate" value, which is not sent;
- note nodes (types the server does not know) and muted nodes are left out, and inputs linked to a node
  that is left out are dropped;
- a widget input that is linked takes the link.
"""
from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4
SEED_NAMES = ("seed", "noise_seed")


class WorkflowError(ValueError):
    """A workflow that cannot be converted, with the reason."""


def object_info_in_process(class_types) -> dict[str, dict]:
    """/object_info's entries (inputs, outputs) for `class_types`, from a ComfyUI imported in this process."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    info = {}
    for class_type in class_types:
        node_class = nodes.NODE_CLASS_MAPPINGS.get(class_type)
        if node_class is None:
            continue
        if issubclass(node_class, _ComfyNodeInternal):
            info[class_type] = node_class.GET_NODE_INFO_V1()
        else:
            inputs = node_class.INPUT_TYPES()
            outputs = list(node_class.RETURN_TYPES)
            info[class_type] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                                "output": outputs, "output_name": list(getattr(node_class, "RETURN_NAMES", outputs)),
                                "description": getattr(node_class, "DESCRIPTION", "")}
    return info


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return spec[0] == "INT" and name in SEED_NAMES


def widget_layout(node_info: dict) -> list[tuple[str, bool]]:
    """(input name, followed by a control value?) for each widget, in `widgets_values` order."""
    layout = []
    for section in ("required", "optional"):
        specs = node_info["input"].get(section, {})
        for name in node_info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if _is_widget(spec):
                layout.append((name, _has_control_widget(name, spec)))
    return layout


def widget_values_by_name(node: dict, node_info: dict) -> dict[str, Any]:
    """The node's widget values keyed by input name.

    A workflow saved before a node gained new (optional, trailing) inputs has fewer values: those inputs
    are left out, so the node's defaults apply, as in the editor.
    """
    layout = widget_layout(node_info)
    values = list(node.get("widgets_values") or [])
    expected = sum(2 if control else 1 for _, control in layout)
    if len(values) > expected:
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values; "
                            f"its definition has {expected} ({', '.join(n for n, _ in layout)})")
    named, position = {}, 0
    for name, control in layout:
        if position >= len(values):
            if name in node_info["input"].get("required", {}):
                raise WorkflowError(f"node {node['id']} ({node['type']}) has no value for its input '{name}'")
            continue
        named[name] = values[position]
        position += 2 if control else 1
    return named


def ui_to_api(workflow: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """The API-format prompt of an editor-format `workflow`."""
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    kept = {node_id for node_id, node in nodes_by_id.items()
            if node["type"] in object_info and node.get("mode", 0) != MUTED}
    prompt = {}
    for node_id in sorted(kept):
        node = nodes_by_id[node_id]
        if node.get("mode", 0) == BYPASSED:
            raise WorkflowError(f"node {node_id} ({node['type']}) is bypassed; bypass is not supported here")
        inputs: dict[str, Any] = widget_values_by_name(node, object_info[node["type"]])
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, origin_id, origin_slot, *_ = links[link_id]
            if origin_id in kept:
                inputs[slot["name"]] = [str(origin_id), int(origin_slot)]
            else:
                inputs.pop(slot["name"], None)
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def nodes_of_type(prompt: dict[str, dict], class_type: str) -> list[dict]:
    """The API-format nodes of one type, in id order."""
    return [prompt[k] for k in sorted(prompt, key=int) if prompt[k]["class_type"] == class_type]
