"""The one reference to the generation being served, and who still uses which one.

Theory of operation. The server takes a generation with :meth:`GenerationHolder.acquire`
when a connection starts and gives it back with :meth:`GenerationHolder.release` when its
handshake is over (only the handshake signs), so a connection keeps the generation it
started with. :meth:`GenerationHolder.swap` replaces the reference; the old generation's
token sessions are closed as soon as its last handshake ends. The new generation's
sessions are open before the old ones close, so the process never drops its token login
and a PIN rotation fails no request.

The holder knows nothing of reloads: the reloader (reload.py) swaps into it, and whoever
needs the reloader (the command line, the admin endpoint) is given it. What must follow the
generation being served (the server's signing limiter, sized to the token's session pool)
registers with :meth:`GenerationHolder.on_swap`.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.generation.model import Generation


class GenerationHolder:
    """Called from the trio thread only (connection tasks and the reloader)."""

    def __init__(self, generation: Generation) -> None:
        self.current = generation
        self._users: dict[int, int] = {}
        self._retiring: dict[int, Generation] = {}
        self._swap_hooks: list[Callable[[Generation], None]] = []

    def on_swap(self, hook: Callable[[Generation], None]) -> None:
        """Call ``hook(new)`` whenever a new generation is served."""
        self._swap_hooks.append(hook)

    def acquire(self) -> Generation:
        """The current generation, held until :meth:`release` (a connection's handshake)."""
        generation = self.current
        self._users[generation.number] = self._users.get(generation.number, 0) + 1
        return generation

    def release(self, generation: Generation) -> None:
        left = self._users.get(generation.number, 1) - 1
        if left > 0:
            self._users[generation.number] = left
            return
        self._users.pop(generation.number, None)
        if self._retiring.pop(generation.number, None) is not None:
            generation.close()

    def swap(self, generation: Generation) -> Generation:
        """Serve ``generation`` from now on; close the old one once nobody holds it."""
        old = self.current
        self.current = generation
        for hook in self._swap_hooks:
            hook(generation)
        if self._users.get(old.number):
            self._retiring[old.number] = old
        else:
            old.close()
        return old

    def close(self) -> None:
        for generation in self._retiring.values():
            generation.close()
        self._retiring.clear()
        self.current.close()
