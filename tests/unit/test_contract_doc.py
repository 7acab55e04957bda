"""docs/contract.md names everything the code offers: every event type, CLI command, configuration key and HTTP
route (a new one the contract does not document fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from pydantic import BaseModel

from dbagent import settings as settings_module
from dbagent.core.events import EventType
from dbagent.interfaces.cli import app as cli_app

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"
TEXT = CONTRACT.read_text(encoding="utf-8")


def test_every_event_type_is_documented_with_its_data():
    rows = set(re.findall(r"^\| `([a-z_.]+)`", TEXT, re.MULTILINE))
    missing = [t.value for t in EventType if t.value not in rows]
    assert not missing, f"event types without a row in docs/contract.md: {missing}"


def _commands(group, prefix: str = "") -> list[str]:
    found = []
    for name, command in sorted(getattr(group, "commands", {}).items()):
        if getattr(command, "hidden", False):
            continue
        found.append(f"{prefix}{name}")
        found.extend(_commands(command, f"{prefix}{name} "))
    return found


def test_every_cli_command_is_documented():
    commands = _commands(typer.main.get_command(cli_app))
    assert commands
    missing = [c for c in commands if f"dbagent {c}" not in TEXT and f"`{c}`" not in TEXT and f"`{c} " not in TEXT]
    assert not missing, f"commands not in docs/contract.md: {missing}"


def _sections() -> dict[str, type[BaseModel]]:
    fields = settings_module.Settings.model_fields
    out = {}
    for name, field in fields.items():
        annotation = field.annotation
        model = getattr(annotation, "__args__", (annotation,))[-1] if name == "databases" else annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            out[name] = model
    return out


@pytest.mark.parametrize("section", sorted(_sections()))
def test_every_configuration_key_is_documented(section):
    model = _sections()[section]
    missing = [key for key in model.model_fields if f"`{key}`" not in TEXT and f"`{section}.{key}`" not in TEXT]
    assert not missing, f"[{section}] keys not in docs/contract.md: {missing}"


def test_every_http_route_is_documented():
    from dbagent.interfaces.api import create_app
    from dbagent.settings import Settings

    api = create_app(Settings(databases={}))
    paths = sorted({route.path for route in api.routes if route.path.startswith("/v1") or route.path in ("/healthz", "/metrics")})
    assert paths
    documented = re.sub(r"\{[^}]*\}", "{}", TEXT)
    missing = [p for p in paths if re.sub(r"\{[^}]*\}", "{}", p) not in documented]
    assert not missing, f"routes not in docs/contract.md: {missing}"
