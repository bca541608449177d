"""The provider policy (``[policy]`` and its ``[[policy.class]]`` overrides): what it may say, checked
key by key with the setting named in every error, and what it says for a device (folders, kinds, limits,
which preferences a user may change). Pure data: the policy plugin (``plugins/policy.py``) applies it.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any

from cpmproxy.config import ConfigError, has_type, unknown_key, wrong_type
from plugins.cpm import KINDS, PREFERENCES, SYNC_KINDS

__all__ = ["DeviceClass", "Policy", "parse_policy"]

_POLICY_KEYS = {
    "folders": list, "exclude_folders": list, "sync": dict, "max_size": int, "max_age_days": int,
    "user_may_change": list, "local_delete": bool, "notifications": str, "delete_mode": str,
}


def _inbox_pattern(pattern: str) -> str:
    if pattern[:5].upper() == "INBOX" and pattern[5:6] in ("", "/", "*", "?", "["):
        return "INBOX" + pattern[5:]
    return pattern


@functools.lru_cache(maxsize=4096)
def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Glob matching, remembered: every SELECT asks the same few questions (17 preference keys)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Policy:
    """The effective provider policy for one device."""
    folders: tuple[str, ...] = ("*",)
    exclude_folders: tuple[str, ...] = ()
    sync: tuple[tuple[str, bool], ...] = ()
    max_size: int = 0
    max_age_days: int = 0
    user_may_change: tuple[str, ...] = ("*",)
    local_delete: bool = True
    notifications: str = "allowed"
    delete_mode: str = "normal"

    def __post_init__(self) -> None:
        # Folder patterns name INBOX as mailbox_name spells it ("inbox/*" means "INBOX/*").
        for key in ("folders", "exclude_folders"):
            object.__setattr__(self, key, tuple(_inbox_pattern(p) for p in getattr(self, key)))

    def default_sync(self, kind: str) -> bool:
        for k, value in self.sync:
            if k == kind:
                return value
        return True

    @functools.cached_property
    def default_hidden_kinds(self) -> tuple[str, ...]:
        """The kinds not synchronized where the user set no preference (the common case: worked out once
        per policy, not at every SELECT)."""
        return tuple(k for k in KINDS if not self.default_sync(k))

    def may_change(self, key: str) -> bool:
        return _matches_any(key, self.user_may_change)

    def folder_allowed(self, name: str) -> bool:
        return _matches_any(name, self.folders) and not _matches_any(name, self.exclude_folders)



_CLASS_KEYS = ("name", "users", "devices")


def _check_policy_table(table: dict[str, Any], where: str, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """``also``: the other keys the table may hold (for the "did you mean" hint)."""
    out = {}
    for key, value in table.items():
        if key not in _POLICY_KEYS:
            raise unknown_key(key, list(_POLICY_KEYS) + list(also), f"{where}.")
        kind = _POLICY_KEYS[key]
        if not has_type(value, kind):
            raise wrong_type(f"{where}.{key}", kind, value)
        if kind is list and not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}.{key}: expected an array of strings")
        if key == "user_may_change":
            _check_preference_patterns(value, f"{where}.{key}")
        elif key in ("folders", "exclude_folders"):
            _check_globs(value, f"{where}.{key}", folders=True)
        if key == "sync":
            for k, v in value.items():
                if k not in SYNC_KINDS:
                    raise ConfigError(f"{where}.sync.{k}: unknown kind (known: {', '.join(SYNC_KINDS)})")
                if not isinstance(v, bool):
                    raise ConfigError(f"{where}.sync.{k}: expected true or false")
            value = tuple(sorted(value.items()))
        elif key in ("max_size", "max_age_days") and value < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0")
        elif key == "notifications" and value not in ("allowed", "forced", "off"):
            raise ConfigError(f"{where}.notifications: must be 'allowed', 'forced' or 'off'")
        elif key == "delete_mode" and value not in ("normal", "local"):
            raise ConfigError(f"{where}.delete_mode: must be 'normal' or 'local'")
        elif kind is list:
            value = tuple(value)
        out[key] = value
    return out


def _unclosed_bracket(pattern: str) -> bool:
    """Has ``pattern`` a ``[`` that fnmatch takes as the character, no ``]`` closing it (as fnmatch reads
    a set: a ``]`` first, or after ``!``, is a member)?"""
    i = 0
    while (i := pattern.find("[", i) + 1) > 0:
        j = i + (pattern[i:i + 1] == "!")
        j += pattern[j:j + 1] == "]"
        if (j := pattern.find("]", j)) < 0:
            return True
        i = j + 1
    return False


def _check_globs(patterns: list[str], where: str, folders: bool = False) -> None:
    """Glob patterns that can match nothing were taken silently (a folder pattern hid or showed nothing):
    an empty one, one whose ``[`` is never closed (fnmatch then takes it as the character), and, for
    folders, one that begins or ends with the separator (no folder name does: ``Archive/*``, not ``/Archive/``)."""
    for i, pattern in enumerate(patterns):
        problem = None
        if not pattern:
            problem = "an empty pattern matches nothing"
        elif _unclosed_bracket(pattern):
            problem = "its '[' is never closed by ']' (for a literal '[', write '[[]')"
        elif folders and (pattern.startswith("/") or pattern.endswith("/")):
            problem = "no folder name begins or ends with '/' (e.g. 'Archive/*' for the folders below Archive)"
        if problem:
            raise ConfigError(f"{where}[{i}]: {pattern!r}: {problem}")


def _check_preference_patterns(patterns: list[str], where: str) -> None:
    """Each pattern must name a preference (a misspelt one would silently forbid the change it meant)."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in PREFERENCES):
            raise ConfigError(f"{where}: {pattern!r} matches no preference (preferences: "
                              f"{', '.join(sorted(PREFERENCES))})")


@dataclass(frozen=True)
class DeviceClass:
    name: str
    users: tuple[str, ...]
    devices: tuple[str, ...]
    settings: dict = field(hash=False, compare=False, default_factory=dict)

    def matches(self, user: str, device_id: str, id_name: str, fold_user: bool = False) -> bool:
        """``fold_user``: the user name is folded to ASCII lower case (``[backend] username_case``), and so
        are the ``users`` patterns (a class for "Dave" never matched: the session's user is "dave")."""
        users = (p.encode().lower().decode() for p in self.users) if fold_user else self.users
        if not any(fnmatch.fnmatchcase(user, p) for p in users):
            return False
        return any(fnmatch.fnmatchcase(device_id, p) or (id_name and fnmatch.fnmatchcase(id_name, p))
                   for p in self.devices)


def parse_policy(table: dict[str, Any]) -> tuple[Policy, list[DeviceClass]]:
    table = dict(table)
    classes_raw = table.pop("class", [])
    base = Policy(**_check_policy_table(table, "policy", also=("class",)))
    if not isinstance(classes_raw, list):
        raise ConfigError("policy.class: use [[policy.class]] tables")
    classes = []
    for i, raw in enumerate(classes_raw):
        if not isinstance(raw, dict):
            raise ConfigError(f"policy.class[{i}]: expected a table ([[policy.class]])")
        raw = dict(raw)
        name = raw.pop("name", f"class{i}")
        users = raw.pop("users", ["*"])
        devices = raw.pop("devices", ["*"])
        if not isinstance(name, str) or not name:
            raise ConfigError(f"policy.class[{i}].name: expected a non-empty string")
        for k, v in (("users", users), ("devices", devices)):
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                # (an empty array matches nobody: the class would never apply)
                raise ConfigError(f"policy.class[{i}].{k}: expected a non-empty array of glob patterns")
            _check_globs(v, f"policy.class[{i}].{k}")
        settings = _check_policy_table(raw, f"policy.class[{i}]", also=_CLASS_KEYS)
        classes.append(DeviceClass(name, tuple(users), tuple(devices), settings))
    return base, classes
