"""The layering rule of the storage contract (issue 29), read from the sources themselves.

``statemachine/`` may import from ``storage/`` only the contract (``storage.contract``), its data
(``storage.types``) and the errors; every store implements every operation of the protocol;
choosing a store imports no database driver.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from walstate.storage import contract
from walstate.storage.memory import MemoryStore
from walstate.storage.postgres import PgStore
from walstate.storage.store import Store

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"contract", "types", "errors"}
#: Imports of other storage modules that stay, and why. Anything else is a layering error.
EXCEPTIONS = {
    # guarded_update and Deduper are user-facing helpers for a transactional step's own SQL (step.db, the
    # escape hatch), re-exported by walstate/__init__.py; nothing in the core calls them.
    ("__init__.py", "dedup"),
    # Fault injection is still process-wide (issue 29 moves it onto the store instance).
    ("runner.py", "faults"), ("testing.py", "faults"), ("_crash_child.py", "faults"),
}


def storage_imports(path: Path) -> set[str]:
    """The storage modules ``path`` imports (``from .storage.X import`` or ``from .storage import X``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None:
            parts = node.module.split(".")
            if parts[0] != "storage":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
    return found


def operations() -> list[str]:
    return [name for name, member in vars(contract.Storage).items()
            if not name.startswith("_") and (callable(member) or isinstance(member, property))]


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "statemachine").glob("*.py")))
def test_statemachine_imports_only_the_contract_its_data_and_errors_from_storage(module: str) -> None:
    wrong = {m for m in storage_imports(ROOT / "statemachine" / module) if m not in ALLOWED
             and (module, m) not in EXCEPTIONS}
    assert not wrong, f"statemachine/{module} imports storage modules beyond the contract: {sorted(wrong)}"


def test_the_layering_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from .storage.writepath import WritePath\nfrom .storage import reads, Storage\n")
    assert storage_imports(bad) == {"writepath", "reads", "Storage"}


def test_the_protocol_has_the_documented_operations_each_with_a_docstring() -> None:
    ops = operations()
    assert len(ops) >= 25
    undocumented = [name for name in ops if name not in ("durability",)
                    and not inspect.getdoc(getattr(contract.Storage, name))]
    assert not undocumented, f"operations without a docstring: {undocumented}"


@pytest.mark.parametrize("store", [MemoryStore, Store, PgStore], ids=lambda c: c.__name__)
def test_every_store_implements_every_operation_with_the_protocols_parameters(store: type) -> None:
    for name in operations():
        member = getattr(contract.Storage, name)
        if isinstance(member, property):
            continue  # instance attributes or properties: the contract suite reads them on live stores
        mine = getattr(store, name, None)
        assert mine is not None, f"{store.__name__} lacks {name}"
        want = list(inspect.signature(member).parameters)
        got = list(inspect.signature(mine).parameters)
        assert got[:len(want)] == want, f"{store.__name__}.{name}{got} differs from the protocol's {want}"


def test_choosing_a_store_and_opening_memory_imports_no_database_driver() -> None:
    code = ("import sys; from walstate.storage.contract import open_store; open_store('memory://x').close(); "
            "print(sorted(m for m in ('peewee', 'psycopg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
