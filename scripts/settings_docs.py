"""Configuration tables for README.md, generated from the settings classes.

    python scripts/settings_docs.py          # rewrite the tables in README.md
    python scripts/settings_docs.py --check  # exit 1 if README.md is out of date

tests/test_readme.py runs the check, so the documented settings are the real ones.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic_settings import BaseSettings

from coordinator.settings import CoordinatorSettings
from regional_node.settings import NodeSettings

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS: dict[str, type[BaseSettings]] = {
    "coordinator": CoordinatorSettings,
    "node": NodeSettings,
}


# Descriptions for settings whose Field has none (kept here so the settings
# modules, edited by many hands, need not change). tests/test_readme.py fails
# when a setting has neither, or when an entry here names no setting.
EXTRA_DESCRIPTIONS: dict[str, str] = {
    "COORDINATOR_ROUND_DEADLINE_SECONDS": "Seconds a round stays open; at the deadline it "
    "closes with MIN_UPDATES updates, or is extended.",
    "COORDINATOR_ROUND_CHECK_SECONDS": "How often the background task checks whether the "
    "open round can close.",
    "COORDINATOR_MAX_UPDATE_BYTES": "Largest accepted update body (413 above).",
    "COORDINATOR_MAX_NUM_EXAMPLES": "Largest `num_examples` a node may claim for one update.",
    "COORDINATOR_EMBEDDING_DIM": "Embedding size of the model created on the first catalog upload.",
    "COORDINATOR_MODEL_SEED": "Seed of the initial model (version 1).",
    "COORDINATOR_MIGRATE_ON_START": "Bring the database schema to head when the service starts.",
    "COORDINATOR_LOG_JSON": "Log one JSON object per line.",
    "NODE_REGION": "The region this node serves (as registered).",
    "NODE_DATABASE_URL": "SQLAlchemy URL of the node's private event store.",
    "NODE_POLL_SECONDS": "Seconds between polls of the coordinator (base of the backoff).",
    "NODE_LOCAL_EPOCHS": "Passes over the local examples per round.",
    "NODE_LEARNING_RATE": "Adam learning rate of local training.",
    "NODE_BATCH_SIZE": "Examples per training step.",
    "NODE_NUM_NEGATIVES": "Shared sampled negatives per training batch.",
    "NODE_FEDPROX_MU": "FedProx proximal term towards the round's base weights (0 = off).",
    "NODE_MAX_EVENTS_PER_BATCH": "Largest accepted POST /v1/events batch (413 above).",
    "NODE_BACKOFF_MAX_SECONDS": "Cap of the exponential backoff when the coordinator fails.",
    "NODE_LOG_JSON": "Log one JSON object per line.",
}


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " / ".join(str(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None").replace("|", "or")


def env_names(cls: type[BaseSettings]) -> list[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return [f"{prefix}{name.upper()}" for name in cls.model_fields]


def settings_table(cls: type[BaseSettings]) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        env = f"{prefix}{name.upper()}"
        default = "(required)" if info.is_required() else repr(info.default)
        default = "unset" if default == "None" else f"`{default}`"
        description = info.description or EXTRA_DESCRIPTIONS.get(env, "")
        description = description.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{env}` | {_type_name(info.annotation)} | {default} | {description} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    for key, cls in SECTIONS.items():
        start, end = f"<!-- settings:{key}:start -->", f"<!-- settings:{key}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md lacks the {start} ... {end} markers")
        block = f"{start}\n{settings_table(cls)}\n{end}"
        readme = pattern.sub(lambda _m, block=block: block, readme)
    return readme


def main(argv: list[str]) -> int:
    current = README.read_text()
    wanted = render(current)
    if "--check" in argv:
        if wanted != current:
            print("README.md configuration tables are stale: run python scripts/settings_docs.py")
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
