"""What the docs say about the deployment matches what the compose file does."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose_auth_manager() -> str:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    managers = {
        env["AIRFLOW__CORE__AUTH_MANAGER"]
        for key, env in compose.items()
        if key.startswith("x-") and isinstance(env, dict) and "AIRFLOW__CORE__AUTH_MANAGER" in env
    }
    assert len(managers) == 1, managers
    return managers.pop()


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_every_doc_names_the_auth_manager_compose_uses():
    manager = _compose_auth_manager()
    assert manager.endswith("FabAuthManager")
    auth = _section((REPO / "docs" / "deployment.md").read_text(), "## Authentication")
    readme = _section((REPO / "README.md").read_text(), "## Deployment")
    security = (REPO / "docs" / "deployment-security.md").read_text()
    for name, text in (("deployment.md", auth), ("README", readme), ("security", security)):
        assert "FAB" in text and "Reviewer" in text, name
        # The simple auth manager is not what compose runs (only `make airflow` uses it).
        for line in text.lower().split(". "):
            assert not ("compose" in line and "simple auth manager" in line), (name, line)
