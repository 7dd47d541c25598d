"""The README says what the program does: every command, option, variable and make target it names exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from processor.cli import build_parser
from processor.core.config import _SPEC, VARIABLES, Config
from processor.gateway.config import VARIABLES as GATEWAY_VARIABLES
from tests.helpers import ROOT, free_port

README = (ROOT / "README.md").read_text()
# Names in the README that look like variables (UPPER_CASE with an underscore) but are not the service's.
OTHER_VARIABLES = {"TEST_REDIS_URL", "TEST_POSTGRES_URL", "TEST_TIMESCALEDB_URL", "TEST_BACKENDS", "ON_ERROR_STOP",
                   "TIMESCALEDB_IMAGE", "REDIS_IMAGE"}  # docker-compose.yml's


def _fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _command_lines() -> list[list[str]]:
    """Every `telemetry-processor ...` / `python processor.py ...` invocation in the README, as argv."""
    found = []
    # `telemetry-processor@9464` is a systemd unit, not the program.
    texts = _fenced_blocks("sh") + re.findall(r"`((?:telemetry-processor|python processor\.py)(?: [^`]*)?)`", README)
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            for prefix in ("telemetry-processor", "python processor.py"):
                if line == prefix or line.startswith(prefix + " "):
                    argv = shlex.split(line[len(prefix):].replace("[", " ").replace("]", " ").replace("|", " "))
                    found.append(argv)
    return found


def _config_table() -> dict[str, str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|", section, flags=re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_the_configuration_table_names_exactly_the_variables_the_loader_reads():
    assert set(_config_table()) == set(VARIABLES)


def test_the_configuration_table_gives_the_loader_defaults():
    defaults = Config()
    for name, shown in _config_table().items():
        field = _SPEC[name][0]
        if field == "consumer_name":
            assert shown == "the host name"
            continue
        value = getattr(defaults, field)
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        assert shown == f"`{value}`", name


def test_every_variable_named_in_the_readme_exists():
    named = set(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9])\b", README))
    unknown = named - set(VARIABLES) - set(GATEWAY_VARIABLES) - OTHER_VARIABLES
    assert not unknown, f"README names variables the program does not read: {sorted(unknown)}"


@pytest.mark.parametrize("argv", _command_lines(), ids=lambda a: " ".join(a) or "(no arguments)")
def test_every_command_in_the_readme_parses(argv):
    # Placeholders (N, R, S) stand for numbers and reasons: give them real values.
    if "COMMAND" in argv:
        return  # "python processor.py COMMAND": the generic form
    concrete = []
    for a in argv:
        if a in ("N", "R", "S"):
            a = "db_rejected" if concrete and concrete[-1] == "--reason" else "10"
        concrete.append(a)
    if concrete in (["--version"], ["--help"]):
        return
    if concrete[:1] == ["dead-letters"] and len(concrete) >= 3 and concrete[2] in ("list", "redrive"):
        concrete = concrete[:1] + concrete[2:]  # "list | redrive" written as alternatives
    build_parser().parse_args(concrete)


def test_the_commands_table_matches_the_cli_subcommands():
    section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `telemetry-processor ([a-z-]+)", section, flags=re.MULTILINE))
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert named == set(subcommands)


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"\bmake ([a-z-]+)", README))
    assert named and named <= targets, named - targets


def test_help_lists_every_variable_and_every_command():
    result = subprocess.run([sys.executable, str(ROOT / "processor.py"), "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    for name in VARIABLES:
        assert name in result.stdout, name
    for command in ("run", "migrate", "replay", "dead-letters", "simulate"):
        assert command in result.stdout


@pytest.mark.parametrize("command, options", [
    ("replay", ["--min-idle-ms", "--limit", "--dry-run"]),
    ("simulate", ["--devices", "--rate", "--duration", "--count"]),
])
def test_subcommand_help_names_the_readme_options(command, options):
    result = subprocess.run([sys.executable, str(ROOT / "processor.py"), command, "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    for option in options:
        assert option in result.stdout
        assert option in README


def test_readme_files_it_points_at_exist():
    for path in re.findall(r"`((?:deploy|docs|bench)/[\w./-]+)`", README) + \
            re.findall(r"\]\(((?:docs|deploy)/[\w./-]+|CHANGELOG\.md)\)", README):
        assert (ROOT / path).exists(), path


# --- the first hour ---------------------------------------------------------------------

def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _makefile_target(name: str) -> str:
    """The recipe of one make target."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{name}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert match, f"no make target {name}"
    return match.group(1)


def test_the_readme_puts_telemetry_processor_on_path_before_using_it():
    # `make run` installs into .venv; the bare command is not on PATH until the venv is activated.
    text = "\n".join(_fenced_blocks("sh"))
    activate = text.index(". .venv/bin/activate\n")
    first_use = min(m.start() for m in re.finditer(r"^telemetry-processor ", text, flags=re.MULTILINE))
    assert activate < first_use, "telemetry-processor used before the README says how to get it on PATH"
    assert activate < text.index("telemetry-processor migrate")
    assert "telemetry-processor" in _section("Quick start") and ". .venv/bin/activate" in _section("Quick start")
    assert re.search(r"^VENV \?= \.venv$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)


def test_the_readme_way_to_the_command_works():
    venv = ROOT / ".venv" / "bin" / "activate"
    if not venv.is_file():
        message = "no .venv here (make venv creates it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a fresh shell: no .venv/bin on it
    script = ". .venv/bin/activate\ncommand -v telemetry-processor\ntelemetry-processor --version"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    found, version = result.stdout.splitlines()
    assert Path(found) == ROOT / ".venv" / "bin" / "telemetry-processor"  # the one `make run` installed
    assert version.startswith("telemetry-processor ")


def test_the_quick_start_says_how_to_feed_positions_to_make_run():
    quick = _section("Quick start")
    assert "make run" in quick and "make simulate" in quick
    recipe = _makefile_target("simulate")
    assert "processor.py simulate" in recipe and "devservers" not in recipe  # the Redis of REDIS_URL, as run
    # The simulator's own defaults (100 devices, as fast as possible) would flood a first look.
    assert "--rate 20" in recipe and "--devices 20" in recipe


def test_help_shows_each_default_as_the_readme_writes_it():
    result = subprocess.run([sys.executable, str(ROOT / "processor.py"), "--help"], capture_output=True,
                            text=True, timeout=30)
    shown = dict(re.findall(r"^  ([A-Z_]+) .*; default (.+)$", result.stdout, flags=re.MULTILINE))
    table = {name: default.strip("`") for name, default in _config_table().items()}
    assert set(shown) == set(table)
    assert shown == table
    assert (shown["MIGRATE_ON_START"], shown["SHUTDOWN_TIMEOUT_S"]) == ("true", "15")


def _exit_statuses(command: str) -> str:
    section = _section("Commands")
    row = re.search(rf"^\| `telemetry-processor {command}[ `].*\| (.+?) \|$", section, flags=re.MULTILINE)
    assert row, command
    return row.group(1)


def test_the_commands_table_gives_simulates_exit_statuses(redis_url, keys):
    statuses = _exit_statuses("simulate")
    assert re.match(r"0 .*; 1 if Redis is unreachable", statuses), statuses
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    runs = {}
    for url in (redis_url, f"redis://127.0.0.1:{free_port()}/0"):
        runs[url] = subprocess.run([sys.executable, str(ROOT / "processor.py"), "simulate", "--count", "1"],
                                   env=dict(env, REDIS_URL=url, STREAM_KEY=keys["stream"]), cwd=ROOT,
                                   capture_output=True, text=True, timeout=30)
    ok, refused = runs.values()
    assert ok.returncode == 0, ok.stderr
    assert refused.returncode == 1
    assert "simulate failed: publishing to Redis failed" in refused.stderr and "Traceback" not in refused.stderr
