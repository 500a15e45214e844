"""Making plans: the findings of a fresh snapshot, ``build_plan`` (pure), the plan
stored, and its audit entry."""

from __future__ import annotations

import uuid

from agent.domain.inventory import Inventory
from agent.domain.plans import Plan, build_plan
from agent.errors import NotFound
from agent.store.audit import AuditLog
from agent.store.state import StateStore
from shared.policy import Policy


class Planner:
    def __init__(
        self,
        inventory: Inventory,
        state: StateStore,
        audit: AuditLog,
        *,
        ttl_seconds: int,
        max_plans: int,
    ) -> None:
        self.inventory = inventory
        self.state = state
        self.audit = audit
        self.ttl_seconds = ttl_seconds
        self.max_plans = max_plans

    def create(self, policy: Policy, *, actor: str) -> Plan:
        """Plan a clean-up under ``policy`` from the findings as they are now (after a
        commit, so that the generations kept for the re-check are settled). At most
        ``max_plans`` are kept (``TooMany``); a plan whose audit entry cannot be written
        is not kept either."""
        self.state.reserve_plan_slot(self.inventory.clock(), max_plans=self.max_plans)
        snap = self.inventory.fresh_snapshot(commit=True)
        found = self.inventory.compute_findings(
            snap,
            kinds=policy.kinds,
            min_age_seconds=policy.min_age_seconds,
            protect_labels=policy.protect_labels,
        )
        plan = build_plan(
            found,
            policy,
            plan_id=uuid.uuid4().hex,
            now=self.inventory.clock(),
            ttl_seconds=self.ttl_seconds,
        )
        self.state.save_plan(
            plan.id, created_at=plan.created_at, expires_at=plan.expires_at, body=plan.to_json()
        )
        try:
            self.audit.append(
                actor=actor,
                action="plan.create",
                target=f"plan {plan.id}",
                outcome="created",
                detail={
                    "actions": len(plan.actions),
                    "skipped": len(plan.skipped),
                    "policy": policy.to_json(),
                },
            )
        except BaseException:
            self.state.delete_plan(plan.id)
            raise
        return plan

    def get(self, plan_id: str) -> Plan:
        stored = self.state.get_plan(plan_id)
        if stored is None:
            raise NotFound(f"no plan {plan_id}")
        return Plan.from_json(stored.body)
