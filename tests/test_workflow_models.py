"""example_workflows/*.json carry ComfyUI's ``properties.models`` entries, generated from the model registry
(scripts/annotate_workflows.py): every model file a node names is registered, and every registered hub file
a node names has exactly the registry's entry, so the frontend can list it with its download link."""

from __future__ import annotations

import json
import pytest

from shared_data import REPO_ROOT
from ridfr_core.models import all_files, frontend_models

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_every_model_a_node_names_is_registered_and_carries_its_entry(workflow):
    registered = {file.name: file for file in all_files()}
    named = 0
    for node in json.loads(workflow.read_text())["nodes"]:
        values = [value for value in node.get("widgets_values") or [] if isinstance(value, str)]
        for value in values:
            if value.endswith(WEIGHT_SUFFIXES):
                assert value in registered, f"node {node['id']} ({node['type']}) names {value}, which the registry " \
                                            "(ridfr_core/models/registry.py) does not know"
                named += 1
        entries = node.get("properties", {}).get("models", [])
        assert entries == frontend_models(values), (f"node {node['id']} ({node['type']}): properties.models is out "
                                                    "of date; run python scripts/annotate_workflows.py")
        for entry in entries:
            file = registered[entry["name"]]
            assert entry["directory"] == file.folder
            assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith(f"/{file.path}")
    assert named > 0

