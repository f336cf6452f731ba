"""walstate installs as one top-level name and coexists with python-statemachine and an app's `storage`.

One fresh virtual environment (not the development one) serves every check:
the wheel is built once from a copy of the sources (so stale files of an
in-tree `build/` cannot leak into it), its listing is checked, and the same
wheel is installed with its dependencies, next to `python-statemachine`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


class Installed:
    def __init__(self, wheel: Path, python: Path) -> None:
        self.wheel = wheel
        self.python = python


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("statemachine", "storage"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run(PIP + ["wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("walstate-*.whl")
    # A venv without pip of its own (0.1 s instead of 3 s): the development
    # pip installs into it through --python.
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run(PIP + ["--python", str(python), "install", str(wheel), "python-statemachine"])
    yield Installed(wheel, python)


def test_the_wheel_installs_nothing_at_the_top_level_but_walstate(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        top = {name.split("/", 1)[0] for name in whl.namelist()}
    name, version = installed.wheel.name.split("-")[:2]
    assert top == {"walstate", f"{name}-{version}.dist-info"}


def test_walstate_imports_beside_python_statemachine_and_an_apps_own_storage_module(
        installed: Installed, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "storage.py").write_text("WHOSE = 'the app'\n")
    code = textwrap.dedent("""
        import statemachine, storage
        from walstate import Engine, Workflow
        from walstate.storage import Store
        assert storage.WHOSE == 'the app', storage.__file__
        assert hasattr(statemachine, 'StateMachine'), statemachine.__file__  # python-statemachine's
        assert Engine.__module__ == 'walstate.engine' and Store.__module__.startswith('walstate.storage')
        print('ok')
    """)
    done = _run([str(installed.python), "-c", code], cwd=app)
    assert done.stdout.strip() == "ok"
    script = installed.python.parent / "walstate"
    assert _run([str(script), "--help"], cwd=app).stdout.startswith("usage: walstate")
