"""``shared.policy``: a plan's policy is validated when built, with every bad field named,
and the labels that always protect a volume cannot be taken away."""

from __future__ import annotations

from typing import Any

import pytest

from shared.policy import (
    ALWAYS_PROTECT_LABELS,
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_PLAN_KINDS,
    FINDING_KINDS,
    MAX_AGE_SECONDS,
    MAX_FINDING_IDS,
    MAX_PROTECT_LABELS,
    Policy,
    PolicyError,
    protected_reason,
)


def test_the_defaults() -> None:
    p = Policy()
    assert p.kinds == DEFAULT_PLAN_KINDS == ("dind-volume", "orphan-layer")
    assert p.min_age_seconds == DEFAULT_MIN_AGE_SECONDS == 86400
    assert p.protect_labels == ALWAYS_PROTECT_LABELS
    assert p.finding_ids is None and p.include_named_volumes is False


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"kinds": ()}, "kinds", "at least one kind"),
        ({"kinds": ("dind-volume", "everything")}, "kinds", "unknown kind(s) ['everything']"),
        ({"min_age_seconds": -1}, "min_age_seconds", "a whole number of seconds from 0"),
        ({"min_age_seconds": MAX_AGE_SECONDS + 1}, "min_age_seconds", "a whole number"),
        ({"min_age_seconds": 1.5}, "min_age_seconds", "a whole number"),
        ({"min_age_seconds": True}, "min_age_seconds", "a whole number"),
        ({"min_age_seconds": "60"}, "min_age_seconds", "a whole number"),
        ({"protect_labels": ("",)}, "protect_labels", "label keys of 1 to 255 characters"),
        ({"protect_labels": ("x" * 256,)}, "protect_labels", "label keys of 1 to 255"),
        ({"protect_labels": (7,)}, "protect_labels", "label keys of 1 to 255"),
        (
            {"protect_labels": tuple(f"l{i}" for i in range(MAX_PROTECT_LABELS + 1))},
            "protect_labels",
            f"at most {MAX_PROTECT_LABELS} label keys",
        ),
        ({"finding_ids": ("",)}, "finding_ids", "ids of 1 to 200 characters"),
        ({"finding_ids": ("f" * 201,)}, "finding_ids", "ids of 1 to 200 characters"),
        ({"finding_ids": (None,)}, "finding_ids", "ids of 1 to 200 characters"),
        (
            {"finding_ids": tuple(f"f{i}" for i in range(MAX_FINDING_IDS + 1))},
            "finding_ids",
            f"at most {MAX_FINDING_IDS} ids",
        ),
    ],
)
def test_a_bad_field_is_named_with_what_it_must_be(
    kw: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy(**kw)
    assert list(caught.value.errors) == [field]
    assert any(message in m for m in caught.value.errors[field]), caught.value.errors
    assert str(caught.value).startswith(f"{field}: ")


def test_every_bad_field_at_once() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy(kinds=(), min_age_seconds=-5, protect_labels=("",), finding_ids=("",))
    assert set(caught.value.errors) == {
        "kinds",
        "min_age_seconds",
        "protect_labels",
        "finding_ids",
    }
    assert isinstance(caught.value, ValueError)


def test_the_limits_themselves_are_allowed() -> None:
    Policy(min_age_seconds=0)
    Policy(min_age_seconds=MAX_AGE_SECONDS)
    Policy(protect_labels=tuple(f"l{i}" for i in range(MAX_PROTECT_LABELS)))
    Policy(protect_labels=("x" * 255,), finding_ids=("f" * 200,))
    Policy(finding_ids=tuple(f"f{i}" for i in range(MAX_FINDING_IDS)))
    Policy(kinds=FINDING_KINDS + FINDING_KINDS)


def test_the_always_protecting_labels_cannot_be_taken_away() -> None:
    assert Policy(protect_labels=()).protect_labels == ALWAYS_PROTECT_LABELS
    p = Policy(protect_labels=("ci.keep", "keep", "ci.keep"))
    assert p.protect_labels == (*ALWAYS_PROTECT_LABELS, "ci.keep")


def test_repeats_are_dropped_in_order() -> None:
    p = Policy(kinds=("orphan-layer", "dind-volume", "orphan-layer"), finding_ids=("b", "a", "b"))
    assert p.kinds == ("orphan-layer", "dind-volume")
    assert p.finding_ids == ("b", "a")


def test_json_round_trip_and_defaults_for_what_is_absent() -> None:
    assert Policy.from_json({}) == Policy()
    p = Policy(
        kinds=("stale-qgroups",),
        min_age_seconds=0,
        protect_labels=("ci.keep",),
        finding_ids=("x",),
        include_named_volumes=True,
    )
    assert p.to_json() == {
        "kinds": ["stale-qgroups"],
        "min_age_seconds": 0,
        "protect_labels": ["keep", "nas-janitor.keep", "ci.keep"],
        "finding_ids": ["x"],
        "include_named_volumes": True,
    }
    assert Policy.from_json(p.to_json()) == p
    assert Policy.from_json({"finding_ids": []}).finding_ids == ()
    with pytest.raises(PolicyError):
        Policy.from_json({"min_age_seconds": -1})


@pytest.mark.parametrize(
    ("labels", "extra", "reason"),
    [
        ({}, (), None),
        ({"keep": "true"}, (), "label keep=true"),
        ({"keep": ""}, (), "label keep"),
        ({"nas-janitor.keep": "yes"}, (), "label nas-janitor.keep=yes"),
        ({"keep": "False"}, (), None),
        ({"keep": " off "}, (), None),
        ({"keep": "0"}, (), None),
        ({"keep": "no"}, (), None),
        ({"ci.keep": "1"}, (), None),
        ({"ci.keep": "1"}, ("ci.keep",), "label ci.keep=1"),
        ({"ci.keep": "1", "keep": "true"}, ("ci.keep",), "label keep=true"),
    ],
)
def test_protected_reason(
    labels: dict[str, str], extra: tuple[str, ...], reason: str | None
) -> None:
    assert protected_reason(labels, extra) == reason
