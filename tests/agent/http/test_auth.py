from __future__ import annotations

import pytest

from agent.config import TokenEntry
from agent.errors import Forbidden, Unauthorized
from agent.http.auth import TokenRegistry, hash_token, new_token


def registry() -> tuple[TokenRegistry, str, str]:
    ro, rw = new_token(), new_token()
    reg = TokenRegistry(
        [
            TokenEntry("reader", hash_token(ro), frozenset({"read"})),
            TokenEntry("cleaner", hash_token(rw), frozenset({"clean"})),
        ]
    )
    return reg, ro, rw


def test_tokens_are_random_and_prefixed() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("nj_") and len(a) > 40


def test_authenticate_finds_the_principal() -> None:
    reg, ro, rw = registry()
    assert reg.authenticate(f"Bearer {ro}").id == "reader"
    assert reg.authenticate(f"bearer {rw}").id == "cleaner"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "Bearer nope", "x" * 600]
)
def test_missing_malformed_unknown_are_401(header: str | None) -> None:
    reg, _, _ = registry()
    with pytest.raises(Unauthorized):
        reg.authenticate(header)


def test_scope_is_required_and_clean_does_not_imply_read() -> None:
    reg, _, rw = registry()
    p = reg.authenticate(f"Bearer {rw}")
    TokenRegistry.require(p, "clean")
    with pytest.raises(Forbidden):
        TokenRegistry.require(p, "read")
