"""Write each node's ``properties.models`` in example_workflows/*.json from the model registry
(ridfr_core/models/registry.py), so that ComfyUI's frontend lists missing files with their download link.

    python scripts/annotate_workflows.py

Run it after adding a workflow or changing a model name; tests/test_workflow_models.py checks the result.
"""

import json
from pathlib import Path

from ridfr_core.models import frontend_models

REPO_ROOT = Path(__file__).resolve().parents[1]


def annotate(path: Path) -> bool:
    """Rewrite ``path`` if an entry changes; returns whether it did."""
    text = path.read_text()
    workflow = json.loads(text)
    for node in workflow["nodes"]:
        properties = node.setdefault("properties", {})
        entries = frontend_models(node.get("widgets_values") or [])
        if entries:
            properties["models"] = entries
        else:
            properties.pop("models", None)
    new = json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    for workflow in sorted((REPO_ROOT / "example_workflows").glob("*.json")):
        print(f"{workflow.name}: {'updated' if annotate(workflow) else 'unchanged'}")
