"""Adding the plugin to an InvokeAI the user already has, with the README's pip command.

The target is ROOT/.venv, as the launcher lays it out. So as not to copy 7 GB, it sees this
interpreter's installed distributions (InvokeAI, torch, ...) through a `.pth` line pointing at a
folder of links to them; pip counts those as installed, and never uninstalls them, since they lie
outside the target environment. That host also holds textual, the one requirement of ours that
InvokeAI does not bring (a real host gets it from the index), so the install adds the plugin only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

from invokeai_ti_plugin.host.app_config import find_root

CHECKOUT = Path(__file__).resolve().parents[1]
OUR_ENTRIES = ("invokeai_ti_plugin", "__editable__", "__pycache__")


def _host_view(folder: Path) -> Path:
    """Links to everything this interpreter has installed, except this plugin and .pth files."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(OUR_ENTRIES) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def _venv_holding_invokeai(root: Path, view: Path) -> Path:
    """ROOT/.venv made by `python -m venv`, seeing InvokeAI (and pip) through `view`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / ".venv"], check=True)
    python = root / ".venv" / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.strip()) / "invokeai-host.pth").write_text(f"{view}\n")
    return python


def _clean_env(home: Path) -> dict[str, str]:
    """No INVOKEAI_ROOT, no VIRTUAL_ENV, no pip settings of this machine; HOME elsewhere; and
    no look for a newer pip, which would go to the network."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def _run(*command: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _installed(python: Path, env: dict[str, str]) -> dict[str, str]:
    listed = json.loads(_run(python, "-m", "pip", "list", "--format=json", env=env))
    return {entry["name"].lower(): entry["version"] for entry in listed}


def _checkout_copy(folder: Path) -> Path:
    """The files a build reads, so that pip's build leaves the real checkout alone."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(CHECKOUT / name, folder / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(CHECKOUT / "invokeai_ti_plugin", folder / "invokeai_ti_plugin", ignore=ignore)
    return folder


@pytest.mark.slow
def test_pip_install_keeps_the_host_and_finds_its_root(host_root: Path, tmp_path: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    ours_before = sorted(os.listdir(site))
    python = _venv_holding_invokeai(host_root, _host_view(tmp_path / "host-site-packages"))
    env = _clean_env(tmp_path / "home")
    before = _installed(python, env)
    assert before["invokeai"] == version("invokeai") and before["torch"] == version("torch")
    assert "invokeai-ti-plugin" not in before

    # The README's `ROOT/.venv/bin/python -m pip install .`. --no-index only takes away
    # candidates that are not installed, and pip's default strategy (only-if-needed) keeps an
    # installed release that satisfies a requirement, so it cannot change what is chosen: a
    # requirement the host does not already meet fails here instead of being fetched.
    # --no-build-isolation builds with the installed setuptools instead of downloading it.
    source = _checkout_copy(tmp_path / "checkout")
    pip = ("-m", "pip", "install", "--no-index", "--no-build-isolation", ".")
    log = _run(python, *pip, env=env, cwd=source)
    assert "Uninstalling" not in log and "Attempting uninstall" not in log, log
    assert "Successfully installed invokeai-ti-plugin-0.1.0" in log.splitlines(), log

    after = _installed(python, env)
    assert after == {**before, "invokeai-ti-plugin": "0.1.0"}
    assert sorted(os.listdir(site)) == ours_before  # this interpreter's environment untouched
    code = "import invokeai_ti_plugin; print(invokeai_ti_plugin.__file__)"
    where = _run(python, "-c", code, env=env, cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(host_root / ".venv" / "lib")  # not editable

    # run without activating ROOT/.venv, from elsewhere, with no root named anywhere
    command = host_root / ".venv" / "bin" / "invokeai-ti"
    shown = _run(command, "--list-models", env=env, cwd=tmp_path).splitlines()
    assert shown[0] == f"Main models installed in InvokeAI at {host_root.resolve()}:", shown
    assert any(line.split()[0] == "tiny-sd-1" and "sd-1" in line for line in shown[1:]), shown


@pytest.mark.parametrize(
    ("variable", "venv_parent_is_a_root", "expected"),
    [
        ("INVOKEAI_ROOT", True, "elsewhere"),
        ("VIRTUAL_ENV", True, "elsewhere"),
        (None, True, "root"),
        (None, False, "home/invokeai"),
    ],
)
def test_an_unactivated_venvs_root_comes_after_invokeais_variables(
    variable: str | None,
    venv_parent_is_a_root: bool,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "root"
    (root / ".venv").mkdir(parents=True)
    if venv_parent_is_a_root:
        (root / "invokeai.yaml").write_text("schema_version: 4.0.2\n")
    monkeypatch.setattr(sys, "prefix", str(root / ".venv"))  # as if run as ROOT/.venv/bin/...
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INVOKEAI_ROOT", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    if variable == "INVOKEAI_ROOT":
        monkeypatch.setenv(variable, str(tmp_path / "elsewhere"))
    elif variable == "VIRTUAL_ENV":
        monkeypatch.setenv(variable, str(tmp_path / "elsewhere" / ".venv"))
    assert find_root().resolve() == (tmp_path / expected).resolve()
