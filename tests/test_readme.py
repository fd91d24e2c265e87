"""README.md matches the code: configuration tables, client example, deployment secrets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import shared.client
from scripts.settings_docs import EXTRA_DESCRIPTIONS, SECTIONS, env_names, render

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_tables_are_generated_from_the_settings() -> None:
    assert render(README) == README, "run: python scripts/settings_docs.py"
    for cls in SECTIONS.values():
        for name in env_names(cls):
            assert f"| `{name}` |" in README


def test_every_setting_is_described_once() -> None:
    all_names = {n for cls in SECTIONS.values() for n in env_names(cls)}
    assert set(EXTRA_DESCRIPTIONS) <= all_names, "descriptions of settings that do not exist"
    for cls in SECTIONS.values():
        prefix = str(cls.model_config.get("env_prefix"))
        for field, info in cls.model_fields.items():
            name = f"{prefix}{field.upper()}"
            described = bool(info.description) + (name in EXTRA_DESCRIPTIONS)
            assert described == 1, f"{name}: describe it in the Field or in EXTRA_DESCRIPTIONS"


def test_sections_and_client_example() -> None:
    for heading in (
        "## Quick start",
        "## Architecture",
        "## API overview",
        "## Configuration",
        "## Deployment (docker compose)",
        "## Python client",
        "## What data stays in a region",
        "## Evaluation",
        "## Performance",
        "## Privacy",
        "## Security",
    ):
        assert f"\n{heading}\n" in README, heading
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "shared.client":
                for alias in node.names:
                    assert hasattr(shared.client, alias.name), alias.name


def test_env_example_sets_every_secret_the_compose_file_reads() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    secrets = {
        v
        for v in re.findall(r"\$\{([A-Z0-9_]+)", compose)
        if re.search("SECRET|TOKEN|PASSWORD|KEY", v)
    }
    assert secrets
    for name in secrets:
        assert re.search(rf"^{name}=\S+", example, re.M), name
