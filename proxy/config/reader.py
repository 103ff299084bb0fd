"""The strict TOML reader: every key known, present when required, of the right type.

Theory of operation. :class:`Table` wraps one TOML table and its dotted prefix, so that
every error names the whole key (``tls.certificate: ...``); :meth:`Table.finish` refuses
the keys nobody took (a typo is an error, never ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.errors import ConfigError


class Table:
    """A TOML table read strictly: every key must be consumed, every type checked."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = dict(data)
        self._prefix = prefix
        self._known: list[str] = []

    def key_name(self, key: str) -> str:
        """The whole dotted name of ``key`` in this table, as errors show it."""
        return f"{self._prefix}{key}"

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self._known.append(key)
        if key not in self._data:
            if default is ...:
                raise ConfigError(f"{self.key_name(key)}: required key is missing")
            return default
        value = self._data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass in Python, but `sessions = true` is not a number.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.key_name(key)}: expected {kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(
                f"{self.key_name(key)}: expected {kind_name(kinds)}, got {type(value).__name__}"
            )
        return value

    def table(self, key: str) -> Table:
        value = self.take(key, dict)
        return Table(value, f"{self.key_name(key)}.")

    def optional_table(self, key: str, prefix: str | None = None) -> Table:
        """The table at ``key``, or an empty one (named ``prefix``) when it is absent."""
        if key in self._data:
            return self.table(key)
        return Table({}, f"{self.key_name(key)}." if prefix is None else prefix)

    def has(self, key: str) -> bool:
        """Whether ``key`` is still there to take."""
        return key in self._data

    def remaining(self) -> list[str]:
        """The keys not taken yet (the names of ``[upstreams.NAME]`` tables, say)."""
        return list(self._data)

    def finish(self) -> None:
        for key in self._data:
            raise ConfigError(
                f"{self.key_name(key)}: unknown key (known here: {', '.join(self._known)})"
            )


def kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        dict: "a table",
        bool: "true/false",
        list: "a list",
    }
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def positive(value: float, where: str) -> float:
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value}")
    return float(value)


def resolve_path(value: str, base: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def string_list(table: Table, key: str) -> list[str]:
    values = table.take(key, list, [])
    for position, value in enumerate(values, start=1):
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{table.key_name(key)}: entry {position} must be a non-empty string, got {value!r}"
            )
    return list(values)


def list_of(table: Table, key: str, kind: type, what: str) -> list[Any]:
    items = table.take(key, list, [])
    for position, item in enumerate(items, start=1):
        if not isinstance(item, kind):
            raise ConfigError(
                f"{table.key_name(key)}: expected a list of {what}, item {position} is "
                f"{type(item).__name__}"
            )
    return list(items)
