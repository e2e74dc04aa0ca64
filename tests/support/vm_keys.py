"""Every Redis key of one VM, found by inspecting the key modules, so a key added later is
covered by the slot checks (``tests/unit/shared/test_key_slots.py`` and the Redis Cluster
integration test)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

from keeper_policy.storage import keys as policy_keys
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access import keys as shared_keys

KEY_MODULES = (shared_keys, policy_keys)


def public_builders() -> Iterator[tuple[str, Callable[..., object]]]:
    """Every public function the key modules define, named ``module.function``."""
    for module in KEY_MODULES:
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ == module.__name__ and not name.startswith("_"):
                yield f"{module.__name__}.{name}", function


def per_vm_builders() -> Iterator[tuple[str, Callable[..., object]]]:
    """The builders whose first parameter is a VM id."""
    for name, function in public_builders():
        if list(inspect.signature(function).parameters)[:1] == ["vm_id"]:
            yield name, function


def vm_keys(vm_id: str) -> dict[str, str]:
    """Every key of one VM, labelled by its builder (and kind)."""
    found: dict[str, str] = {}
    for name, builder in per_vm_builders():
        parameters = inspect.signature(builder).parameters
        calls = (
            [(f"{name}({kind.value})", builder(vm_id, kind)) for kind in StateKind]
            if "kind" in parameters
            else [(name, builder(vm_id))]
        )
        for label, built in calls:
            for key in built if isinstance(built, list) else [built]:
                found[f"{label} {key}"] = str(key)
    return found
