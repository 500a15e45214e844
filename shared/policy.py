"""What a clean-up may touch: the finding kinds, the policy a plan is made under, and
every default of it, declared once here for the agent's domain, the API's schemas and
the controller.

    >>> Policy(min_age_seconds=0).kinds
    ('dind-volume', 'orphan-layer')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Every kind the agent reports (more may be added; the API says so).
FINDING_KINDS = (
    "dind-volume",
    "orphan-layer",
    "dangling-volume",
    "orphan-layer-folder",
    "layer-folder",
    "stale-qgroups",
)
# What a plan cleans unless it names kinds.
DEFAULT_PLAN_KINDS = ("dind-volume", "orphan-layer")
# Labels that always protect a volume (unless their value says false): a policy can add
# labels, never take these away.
ALWAYS_PROTECT_LABELS = ("keep", "nas-janitor.keep")
DEFAULT_PROTECT_LABELS = ALWAYS_PROTECT_LABELS
# A finding younger than this is blocked as too young.
DEFAULT_MIN_AGE_SECONDS = 86400
MAX_AGE_SECONDS = 10 * 365 * 86400
# An orphan layer (a subvolume, or a plain folder, in the daemon's btrfs/subvolumes/ that
# no layer record names) is only ever cleaned after this long without a change, whatever
# a request asks: Docker creates a layer's subvolume first and records it when the
# layer is complete, so a layer being pulled, imported or built looks orphaned meanwhile.
ORPHAN_MIN_AGE_FLOOR_SECONDS = 3600
# Caps on the lists of a plan request (422 beyond): kinds (each at most twice),
# finding ids, protect label keys.
MAX_POLICY_KINDS = 2 * len(FINDING_KINDS)
MAX_FINDING_IDS = 5000
MAX_PROTECT_LABELS = 100
# Kinds never cleaned: reported so a person can act (see their evidence).
REPORT_ONLY_KINDS = frozenset({"layer-folder"})


class PolicyError(ValueError):
    """A policy that cannot be: ``errors`` maps each bad field to its messages."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        self.errors = {k: list(v) for k, v in errors.items()}
        super().__init__("; ".join(f"{k}: {', '.join(v)}" for k, v in self.errors.items()))


@dataclass(frozen=True)
class Policy:
    """What a plan may clean. Validated when built (``PolicyError``).

    ``protect_labels`` always holds ``ALWAYS_PROTECT_LABELS`` (added when missing).
    ``include_named_volumes``: volumes someone named (``-v cache:/var/lib/docker``) are
    planned only when this is set, or when ``finding_ids`` names their finding.
    """

    kinds: tuple[str, ...] = DEFAULT_PLAN_KINDS
    min_age_seconds: int = DEFAULT_MIN_AGE_SECONDS
    protect_labels: tuple[str, ...] = DEFAULT_PROTECT_LABELS
    finding_ids: tuple[str, ...] | None = None
    include_named_volumes: bool = False

    def __post_init__(self) -> None:
        errors: dict[str, list[str]] = {}
        if not self.kinds:
            errors["kinds"] = ["at least one kind"]
        bad = [k for k in self.kinds if k not in FINDING_KINDS]
        if bad:
            errors.setdefault("kinds", []).append(f"unknown kind(s) {bad}; one of {FINDING_KINDS}")
        if (
            type(self.min_age_seconds) is not int
            or not 0 <= self.min_age_seconds <= MAX_AGE_SECONDS
        ):
            errors["min_age_seconds"] = [f"a whole number of seconds from 0 to {MAX_AGE_SECONDS}"]
        if len(self.protect_labels) > MAX_PROTECT_LABELS:
            errors["protect_labels"] = [f"at most {MAX_PROTECT_LABELS} label keys"]
        elif any(not isinstance(x, str) or not 1 <= len(x) <= 255 for x in self.protect_labels):
            errors["protect_labels"] = ["label keys of 1 to 255 characters"]
        if self.finding_ids is not None:
            if len(self.finding_ids) > MAX_FINDING_IDS:
                errors["finding_ids"] = [f"at most {MAX_FINDING_IDS} ids"]
            elif any(not isinstance(x, str) or not 1 <= len(x) <= 200 for x in self.finding_ids):
                errors["finding_ids"] = ["ids of 1 to 200 characters"]
        if errors:
            raise PolicyError(errors)
        labels = tuple(dict.fromkeys((*ALWAYS_PROTECT_LABELS, *self.protect_labels)))
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))
        object.__setattr__(self, "protect_labels", labels)
        if self.finding_ids is not None:
            object.__setattr__(self, "finding_ids", tuple(dict.fromkeys(self.finding_ids)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        """From its JSON shape (``to_json``; the body of ``POST /v1/plans``), defaults
        filling what is absent."""
        ids = data.get("finding_ids")
        return cls(
            kinds=tuple(data.get("kinds") or DEFAULT_PLAN_KINDS),
            min_age_seconds=data.get("min_age_seconds", DEFAULT_MIN_AGE_SECONDS),
            protect_labels=tuple(data.get("protect_labels") or DEFAULT_PROTECT_LABELS),
            finding_ids=tuple(ids) if ids is not None else None,
            include_named_volumes=bool(data.get("include_named_volumes", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds),
            "min_age_seconds": self.min_age_seconds,
            "protect_labels": list(self.protect_labels),
            "finding_ids": list(self.finding_ids) if self.finding_ids is not None else None,
            "include_named_volumes": self.include_named_volumes,
        }


def protected_reason(labels: Mapping[str, str], protect_labels: Sequence[str]) -> str | None:
    """Why a volume's labels protect it, or None. A protect label protects unless its
    value says false/0/no/off; ``ALWAYS_PROTECT_LABELS`` always count."""
    for key in dict.fromkeys((*ALWAYS_PROTECT_LABELS, *protect_labels)):
        if key in labels and labels[key].strip().lower() not in _FALSE_WORDS:
            value = labels[key]
            return f"label {key}={value}" if value else f"label {key}"
    return None


_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
