"""The policy format's JSON Schema as a standalone artifact (editors and CI use it directly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from sidecar.policy.policy_format import SCHEMA

EXAMPLES = Path(__file__).resolve().parents[3] / "policies"


def test_schema_is_valid_draft_2020_12() -> None:
    """The format schema itself passes the 2020-12 meta-schema."""
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.endswith("_test.yaml")),
    ids=lambda p: p.name,
)
def test_example_files_validate_with_plain_tools(path: Path) -> None:
    """Each example file passes the schema with nothing but PyYAML and jsonschema."""
    document = yaml.safe_load(path.read_text("utf-8"))
    assert list(Draft202012Validator(SCHEMA).iter_errors(document)) == []


def test_every_object_closes_its_fields() -> None:
    """Every object in the format refuses unknown fields or constrains its entries."""

    def objects(node: object) -> list[dict[str, object]]:
        if isinstance(node, dict):
            found = [node] if node.get("type") == "object" else []
            return found + [o for value in node.values() for o in objects(value)]
        if isinstance(node, list):
            return [o for value in node for o in objects(value)]
        return []

    for node in objects(SCHEMA):
        if node is SCHEMA["$defs"]["tool"]["properties"]["arguments"]:
            continue  # a JSON Schema document: checked by the schema compiler instead
        assert "additionalProperties" in node, node
