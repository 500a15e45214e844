"""Helpers for the deployment tests: the repository's paths and the prerequisite rule.

A tool a test needs (docker-compose, docker) that is missing skips the test with the
reason, except under CI=true: there it fails with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_LAB_OVERRIDE = Path(__file__).resolve().parent / "compose.lab.yml"
ENV_EXAMPLE = REPO / "deploy" / "nas.env.example"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_prerequisite(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"missing prerequisite on this CI host: {reason}", pytrace=False)
    pytest.skip(f"missing prerequisite: {reason}")


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_prerequisite(f"{name} not found ({hint})")
    return path


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return require_tool("docker-compose", "run `make deps`: Debian's docker-compose package")
