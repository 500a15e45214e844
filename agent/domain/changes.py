"""What tells the kept inventory (``agent.domain.inventory``) that the host changed.

- ``DockerWatch``: Docker's event stream, read in a background thread. Every event
  that can change what the agent lists moves ``epoch``; so does every loss of the
  stream (events may have been missed), and the watch is not ``connected`` until it is
  open again (it retries, waiting longer each time, up to ``max_retry_seconds``).
- The btrfs side is read on demand, not watched: ``Btrfs.change_mark`` (a few tree
  searches with ``min_transid``), the mount tables, and the stamp of Docker's layer
  folder (``Btrfs.folder_stamp``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.host.backend import Docker, EventStream

log = logging.getLogger("nas_janitor.agent")


class DockerWatch:
    """Docker's events in a daemon thread, started by ``start`` (once; again after
    ``stop``). ``state()`` is (connected, epoch): a snapshot started while connected at
    epoch E saw every change Docker reported before, as long as the state is still
    (True, E)."""

    def __init__(
        self,
        docker: Docker,
        *,
        retry_seconds: float = 0.5,
        max_retry_seconds: float = 30.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._docker = docker
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._on_change = on_change
        self._lock = threading.Lock()
        self._epoch = 0
        self._connected = False
        self._stream: EventStream | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events_seen = 0
        self.connects = 0

    def state(self) -> tuple[bool, int]:
        with self._lock:
            return self._connected, self._epoch

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            stream, thread = self._stream, self._thread
        if stream is not None:
            stream.close()
        if thread is not None:
            thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """True once the stream is open (within ``timeout`` seconds)."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout:
            if self.state()[0]:
                return True
            deadline.wait(0.01)
            waited += 0.01
        return self.state()[0]

    def _bump(self, *, connected: bool | None = None) -> None:
        with self._lock:
            self._epoch += 1
            if connected is not None:
                self._connected = connected
        self._on_change()

    def _run(self) -> None:
        wait = self._retry
        while not self._stop.is_set():
            try:
                stream = self._docker.events()
            except Exception as exc:
                log.debug("docker events: cannot connect: %s", exc)
                self._bump(connected=False)
                self._stop.wait(wait)
                wait = min(wait * 2, self._max_retry)
                continue
            with self._lock:
                self._stream = stream
            self.connects += 1
            # Whatever happened before the stream opened was not seen.
            self._bump(connected=True)
            wait = self._retry
            try:
                for _ in stream:
                    self.events_seen += 1
                    self._bump()
                    if self._stop.is_set():
                        break
            except Exception as exc:
                log.debug("docker events: stream lost: %s", exc)
            finally:
                with self._lock:
                    self._stream = None
                stream.close()
            self._bump(connected=False)
            if not self._stop.is_set():
                self._stop.wait(self._retry)
