"""Design rules that can be checked mechanically (DEVELOPERS.md rules 1 and 6)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import ROOT

CORE = ROOT / "processor" / "core"


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_core_never_imports_domain_or_the_wiring():
    for path in CORE.glob("*.py"):
        for name in _imports(path):
            assert "domain" not in name.split("."), f"{path.name} imports {name}"
            assert "gateway" not in name.split("."), f"{path.name} imports {name}"
            assert not name.startswith(("processor.service", "..service", "processor.cli", "..cli")), \
                f"{path.name} imports {name}"


def test_importing_the_package_reads_no_environment():
    # Importing every module with an environment full of bad values must not fail or read them.
    code = ("import processor.cli, processor.service, processor.core.pipeline, processor.core.writer, "
            "processor.core.decode, processor.simulate, processor.devservers, processor.gateway.config, "
            "processor.gateway.command")
    env = {"BATCH_SIZE": "abc", "LOG_FORMAT": "xml", "METRICS_PORT": "70000", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_only_the_config_loader_reads_the_environment():
    readers = []
    for path in (ROOT / "processor").rglob("*.py"):
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            readers.append(path.relative_to(ROOT).as_posix())
    # devservers is the `make run` wrapper: it passes the environment on to the child it starts.
    # The gateway's loader reads its GATEWAY_* variables the same way (and the shared ones through core's).
    assert sorted(readers) == ["processor/core/config.py", "processor/devservers.py", "processor/gateway/config.py"]
