"""Helpers for the workflow tests: read ComfyUI's UI workflow format and convert it to the API format.

The UI format is what the frontend saves (nodes with ``inputs``/``outputs``/``widgets_values``, and
``links`` as ``[id, from_node, from_slot, to_node, to_slot, type]``). ``widgets_values`` lists one value per
widget input in INPUT_TYPES order (required, then optional); an INT with ``control_after_generate`` (or
named seed/noise_seed, which the frontend treats the same way) adds one more value right after it. Node
definitions are given in /object_info's shape: ``{"input": {"required": {...}, "optional": {...}},
"output": [...]}``.
"""

from __future__ import annotations

from typing import Any

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, never sent to /prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_VALUES = {"image"}  # what the frontend saves for an image_upload button
MODE_ACTIVE = 0


def definitions_from_classes(mapping: dict[str, type]) -> dict[str, dict[str, Any]]:
    """object_info-shaped definitions of node classes (our pack, without a ComfyUI)."""
    defs = {}
    for name, cls in mapping.items():
        types = cls.INPUT_TYPES()
        defs[name] = {"input": {"required": types.get("required", {}), "optional": types.get("optional", {})},
                      "output": list(cls.RETURN_TYPES)}
    return defs


def _options(spec: Any) -> dict[str, Any]:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: Any) -> bool:
    kind = spec[0]
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput")


def has_control(name: str, spec: Any) -> bool:
    return spec[0] == "INT" and bool(_options(spec).get("control_after_generate") or name in ("seed", "noise_seed"))


def all_inputs(defn: dict[str, Any]) -> dict[str, Any]:
    return {**defn["input"].get("required", {}), **defn["input"].get("optional", {})}


def widget_slots(defn: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, spec, is_frontend_only) for each entry of widgets_values, in order. Frontend-only values are never
    sent to /prompt: a seed's control_after_generate, and the "image" of an `image_upload` button (LoadImage)."""
    slots = []
    for name, spec in all_inputs(defn).items():
        if is_widget(spec):
            slots.append((name, spec, False))
            if has_control(name, spec):
                slots.append((f"{name}:control_after_generate", ("COMBO",), True))
            if _options(spec).get("image_upload"):
                slots.append((f"{name}:upload", ("COMBO",), True))
    return slots


def links_by_target(workflow: dict[str, Any]) -> dict[tuple[int, int], list]:
    return {(link[3], link[4]): link for link in workflow["links"]}


def ui_to_api(workflow: dict[str, Any], defs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The /prompt body's "prompt" for a UI workflow (what the frontend's graphToPrompt produces)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    by_target = links_by_target(workflow)
    api: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", MODE_ACTIVE) != MODE_ACTIVE:
            continue
        defn = defs[node["type"]]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        for (name, _spec, control), value in zip(widget_slots(defn), values, strict=False):
            if not control:
                inputs[name] = value
        for slot, entry in enumerate(node.get("inputs", [])):
            link = by_target.get((node["id"], slot))
            if entry.get("link") is None or link is None:
                continue
            source = nodes[link[1]]
            if source["type"] in VIRTUAL_NODES:
                raise ValueError(f"node {node['id']}: input {entry['name']} comes from a {source['type']}")
            inputs[entry["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return api
