"""``reload: {watch: true}``: notice that a handler file changed, by polling modification times.

A daemon thread of the dispatcher stats the ``.py`` files under the
allowlisted modules' locations every ``poll_ms`` (no dependency, no inotify)
and raises a flag, plus a byte on the dispatcher's wake-up pipe, once a
change has held still for one more poll: an editor or a deployment writes a
file in several steps, and one reload should see them all.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from importlib.machinery import PathFinder

log = logging.getLogger("poolport")
MAX_FILES = 20_000  # a tree bigger than this is watched in part (and said so, once)
Fingerprint = dict[str, tuple[int, int]]  # path -> (mtime_ns, size)


def module_roots(modules: list[str], python_path: list[str]) -> list[str]:
    """The files and package directories of the modules' top-level names, found the way a
    worker's import finds them (``python_path`` first) without importing anything."""
    roots: list[str] = []
    for top in dict.fromkeys(m.split(".")[0] for m in modules):
        try:
            spec = PathFinder.find_spec(top, [*python_path, *sys.path])
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots.extend(spec.submodule_search_locations)
        elif spec.origin and spec.origin.endswith(".py"):
            roots.append(spec.origin)
    return roots


def fingerprint(roots: list[str], limit: int = MAX_FILES) -> Fingerprint:
    """``(mtime_ns, size)`` of every ``.py`` file under ``roots`` (at most ``limit`` files)."""
    seen: Fingerprint = {}
    for root in roots:
        paths = [root] if root.endswith(".py") else _walk(root)
        for path in paths:
            if len(seen) >= limit:
                return seen
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def _walk(root: str) -> list[str]:
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        out.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return out


class Settled:
    """Sans-IO: says a change happened once the fingerprint differs from the last one acted on
    and has stayed the same for one more look."""

    def __init__(self, first: Fingerprint) -> None:
        self.base = first
        self.last = first

    def see(self, now: Fingerprint) -> bool:
        previous, self.last = self.last, now
        if now == self.base or now != previous:
            return False
        self.base = now
        return True


class Watcher:
    """The polling thread; :attr:`changed` is set (and ``wake_fd`` written) on a settled change."""

    def __init__(self, modules: list[str], python_path: list[str], poll_s: float, wake_fd: int) -> None:
        self.roots = module_roots(modules, python_path)
        self.poll_s = poll_s
        self.wake_fd = wake_fd
        self.changed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolport-watch", daemon=True)

    def start(self) -> None:
        log.info("watching %d location(s) of the handler modules for changes: %s", len(self.roots), self.roots)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        first = fingerprint(self.roots)
        if len(first) >= MAX_FILES:
            log.warning("more than %d .py files under the handler modules: only some are watched", MAX_FILES)
        settled = Settled(first)
        while not self._stop.wait(self.poll_s):
            if settled.see(fingerprint(self.roots)):
                self.changed = True
                try:
                    os.write(self.wake_fd, b"!")
                except OSError:
                    pass  # full (a wake-up is pending) or closed at shutdown
