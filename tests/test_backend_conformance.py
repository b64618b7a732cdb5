"""The backend conformance suite (ulog_disk.testing.conformance) run by every backend we know of:
the two shipped ones and a third-party plugin, the minimal backend of docs/backends.md, read
from the page itself so that the example there is one that passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from ulog_disk.storage.lmdb_store import LmdbBackend
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.conformance import BackendConformance

DOC = Path(__file__).resolve().parents[1] / "docs" / "backends.md"


def example_source() -> str:
    block = re.search(r"<!-- example: acme_files\.py -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/backends.md has no example block"
    return block.group(1)


def example_module() -> ModuleType:
    """The example, imported from the page (for the in-process tests)."""
    module = ModuleType("acme_files")
    exec(compile(example_source(), f"{DOC}:acme_files.py", "exec"), module.__dict__)  # noqa: S102
    return module


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example as an installed distribution would be (module ``acme_files``, entry point
    ``acme-files``), for the daemon to find through PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    (site / "acme_files.py").write_text(example_source())
    dist = site / "acme_files-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-files\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ulog_disk.backends]\nacme-files = acme_files:FileBackend\n")
    return site


def on_path(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


class TestMemory(BackendConformance):
    backend_class = MemoryBackend
    entry_point = "memory"


class TestLmdb(BackendConformance):
    backend_class = LmdbBackend
    entry_point = "lmdb"


class TestThirdPartyPlugin(BackendConformance):
    backend_class = example_module().FileBackend
    entry_point = "acme-files"

    @pytest.fixture(autouse=True)
    def _installed(self, plugin_site: Path) -> None:
        self.daemon_env = on_path(plugin_site)


def test_the_suite_fails_a_backend_that_forgets_the_retained_state(tmp_path: Path, plugin_site: Path) -> None:
    """The suite has teeth: the example with a drop() that ignores ``retain`` fails exactly the
    test of retention across a restart."""
    (tmp_path / "test_forgetful.py").write_text(textwrap.dedent("""
        from acme_files import FileBackend

        from ulog_disk.testing.conformance import BackendConformance


        class Forgetful(FileBackend):
            def drop(self, uuid, luid, retain, position=None):
                super().drop(uuid, luid, None, position)


        class TestForgetful(BackendConformance):
            backend_class = Forgetful
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                          "test_forgetful.py"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, **on_path(plugin_site)}, timeout=300)
    failed = re.findall(r"^FAILED test_forgetful\.py::TestForgetful::(\S+)", run.stdout, re.M)
    assert failed == ["test_retention_at_the_last_dtr[restarted]"], run.stdout[-3000:]
