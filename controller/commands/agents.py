"""``janitorctl agents``: is every agent up and ready, and what does it run on."""

from __future__ import annotations

from dataclasses import dataclass

import click

from controller.client import AgentClient, Readiness
from controller.commands import global_options
from controller.errors import AgentUnreachable
from controller.output import print_json, table, yes_no
from controller.session import Session
from shared.models import Host, dump


@dataclass(frozen=True)
class AgentInfo:
    readiness: Readiness
    host: Host


def _look(client: AgentClient) -> AgentInfo:
    client.healthz()
    return AgentInfo(readiness=client.readyz(), host=client.host())


@click.command()
@global_options
@click.pass_obj
def agents(session: Session) -> int:
    """Reachability, versions, kernel and storage driver of every agent.

    Exit 1 when an agent is unreachable, refuses the token, or is not ready."""
    with session.clients() as clients:
        outcomes = session.each(clients, _look)
    failed = any(not o.ok or not o.value or not o.value.readiness.ready for o in outcomes)
    if session.json:
        print_json(
            session.out,
            [
                {
                    "agent": o.item.name,
                    "url": o.item.base_url,
                    "ok": o.ok,
                    "error": o.message or None,
                    "ready": o.value.readiness.ready if o.value else None,
                    "not_ready": o.value.readiness.code if o.value else None,
                    "host": dump(o.value.host) if o.value else None,
                }
                for o in outcomes
            ],
        )
        return int(failed)
    rows = []
    for o in outcomes:
        if o.value is None:
            up = "NO" if isinstance(o.error, AgentUnreachable) else "yes"
            rows.append((o.item.name, o.item.base_url, up, "-", "", "", "", "", "", o.message))
            continue
        h, r = o.value.host, o.value.readiness
        rows.append(
            (
                o.item.name,
                o.item.base_url,
                "yes",
                yes_no(r.ready),
                h.agent_version,
                h.kernel.release,
                yes_no(h.kernel.rmdir_deletes_subvolumes),
                h.docker.storage_driver,
                f"docker {h.docker.server_version}, btrfs-progs {h.btrfs_progs_version}",
                "" if r.ready else f"{r.code}: {r.detail}",
            )
        )
    session.out.print(
        table(
            None,
            (
                "AGENT",
                "URL",
                "UP",
                "READY",
                "VERSION",
                "KERNEL",
                "RMDIR SUBVOL",
                "DRIVER",
                "TOOLS",
                "PROBLEM",
            ),
            rows,
        )
    )
    return int(failed)
