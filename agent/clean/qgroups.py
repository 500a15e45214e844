"""Stale qgroups after a delete, on kernels that leave them behind.

Before Linux 6.11 (Synology's 4.4 among them) deleting a subvolume with quotas on leaves
its level-0 qgroup ``0/<id>`` behind; thousands of them slow quota accounting down. After
the agent deletes subvolumes on such a kernel, ``QgroupSweeper.after_delete`` waits in the
background for the kernel's cleaner to drop them (``btrfs subvolume sync``), then
destroys their qgroups (``btrfs qgroup destroy``, retried while the kernel says busy),
each attempt in the audit log. Subvolume ids are never reused, so a qgroup named after a
deleted subvolume can only be that subvolume's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from agent.clean.executor import Executor
from agent.errors import AgentError
from agent.store.audit import AuditLog

log = logging.getLogger("nas_janitor.agent.qgroups")
SWEEP_ACTOR = "agent"


def _in_background(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="qgroups", daemon=True).start()


class QgroupSweeper:
    def __init__(
        self,
        executor: Executor,
        audit: AuditLog,
        *,
        spawn: Callable[[Callable[[], None]], None] = _in_background,
    ) -> None:
        self.executor = executor
        self.audit = audit
        self._spawn = spawn
        self._lock = threading.Lock()  # one sweep at a time

    def after_delete(
        self, *, fs_uuid: str, mount: str, quota_enabled: bool, deleted_ids: Sequence[int]
    ) -> bool:
        """Destroy the qgroups of ``deleted_ids`` in the background (``spawn``) when this
        kernel keeps them and quotas are on. True when a sweep was started."""
        if not deleted_ids or not quota_enabled or self.executor.btrfs.kernel_drops_qgroups():
            return False
        ids = tuple(sorted(set(deleted_ids)))
        self._spawn(lambda: self._sweep(fs_uuid, mount, ids))
        return True

    def _sweep(self, fs_uuid: str, mount: str, ids: tuple[int, ...]) -> None:
        with self._lock:
            try:
                self.executor.btrfs.sync(mount)
            except AgentError as exc:
                log.warning("qgroups of %s: subvolume sync failed: %s", fs_uuid, exc.detail)
            destroyed: list[int] = []
            failed: list[dict[str, str]] = []
            for qid in ids:
                error = self.executor.destroy_qgroup(mount, qid)
                if error is None:
                    destroyed.append(qid)
                else:
                    failed.append({"qgroup": f"0/{qid}", "error": error})
            self.audit.append(
                actor=SWEEP_ACTOR,
                action="qgroup.destroy",
                target=f"filesystem {fs_uuid}",
                outcome="failed" if failed else "deleted",
                detail={"destroyed": [f"0/{i}" for i in destroyed], "failed": failed},
            )
