"""The command line's contract: exit codes, one-screen messages, no traceback, nothing written."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from piimage.cli import main

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH3903J3epy2OvY9kxA4Gr+Ix0/+xMkM+jxK162Gs/b2 me@laptop"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("args", [[], ["build"], ["init"], ["check"]])
def test_help_everywhere(runner, args):
    r = runner.invoke(main, [*args, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_bad_inventory_exit_2_nothing_written(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cluster.yaml").write_text(
        "name: lab\nnetwork: {subnet: 10.0.0.0/24, gateway: 10.0.0.1}\n"
        "nodes:\n  - {hostname: head, role: head, ip: 10.0.0.10}\n  - {hostname: n_1, role: compute, ip: 10.0.0.99}\n"
        "  - {hostname: n2, role: compute, ip: 10.0.0.99}\n"
    )
    r = runner.invoke(main, ["build", "--all"])
    assert r.exit_code == 2
    assert "cluster.yaml:5: nodes[1].hostname: 'n_1' is not a valid hostname" in r.output
    assert "nodes[2].ip: address 10.0.0.99 is used twice (nodes[1])" in r.output
    assert "2 problems in the inventory; nothing was built" in r.output
    assert "Traceback" not in r.output
    assert not Path("out").exists() and not Path(".piimage").exists()


def test_hostname_not_in_inventory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["build", "--hostname", "node9"])
    assert r.exit_code == 2 and "--hostname node9: no such node" in r.output
    assert not Path("out").exists()


def test_role_contradicts_inventory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["build", "--role", "head", "--hostname", "node02"])
    assert r.exit_code == 2 and "node02 is a compute node" in r.output


def test_bad_base_is_a_user_error(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["build", "--hostname", "node02", "--base", "raspios-full"])
    assert r.exit_code == 2 and "not a known image name" in r.output
    assert not Path("out").exists()


def test_missing_tool_exit_2(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: qemu-img, bmaptool … are missing
    r = runner.invoke(main, ["build", "--hostname", "node02"])
    assert r.exit_code == 2
    assert (
        "missing host tools: qemu-img" in r.output
        and "apt-get install" in r.output
        and "qemu-utils" in r.output
    )
    assert not Path("out").exists()


def test_check_lists_nodes(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cluster.yaml").write_text(
        f"name: lab\nadmin: {{ssh_authorized_keys: ['{KEY}']}}\nnetwork: {{subnet: 10.0.0.0/24}}\n"
        "nodes:\n  - {hostname: head, role: head, ip: 10.0.0.10}\n  - {hostname: n1, role: compute, ip: 10.0.0.11}\n"
    )
    r = runner.invoke(main, ["check"])
    assert r.exit_code == 0 and "cluster lab: 2 nodes" in r.output and "n1" in r.output


def test_user_role_from_node_profiles_beside_inventory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "node-profiles").mkdir()
    (tmp_path / "node-profiles" / "login.yaml").write_text("packages: [htop]\n")
    Path("cluster.yaml").write_text(
        "network: {subnet: 10.0.0.0/24}\nnodes:\n  - {hostname: head, role: head, ip: 10.0.0.10}\n"
        "  - {hostname: l1, role: login, ip: 10.0.0.11}\n"
    )
    r = runner.invoke(main, ["check"])
    assert r.exit_code == 0, r.output


def test_init(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    r = runner.invoke(main, ["init", "--dir", str(tmp_path / "c")])
    assert r.exit_code == 0 and (tmp_path / "c" / "cluster.yaml").exists()
    r = runner.invoke(main, ["init", "--dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "not overwriting" in r.output


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--all"], "xz"),
        (["--all", "--compress", "none"], "none"),
        (["--role", "compute", "--hostname", "node02"], "none"),
        (["--hostname", "node02", "--compress", "zstd"], "zstd"),
    ],
)
def test_compression_defaults_to_xz_for_all(runner, tmp_path, monkeypatch, args, want):
    """--all writes an .img.xz beside each .img unless told otherwise; one node is not
    compressed by default. (The integration tests compress only the image they check.)"""
    import piimage.build as buildmod

    seen = {}

    class Planned(BaseException):  # not an Exception: the CLI turns those into "internal error"
        pass

    def fake_plan(cluster, nodes, **kw):
        seen.update(kw, nodes=[n.hostname for n in nodes])
        raise Planned

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(buildmod, "plan", fake_plan)
    with pytest.raises(Planned):
        runner.invoke(main, ["build", *args])
    assert seen["compress"] == want


def test_an_unexpected_exception_is_one_line_not_a_traceback(runner, monkeypatch):
    """A bug of ours reaches the user as one line and exit 1; control characters escaped."""
    import piimage.inventory as inv

    def broken(*a, **k):
        raise KeyError("no\x1b[31m such key")

    monkeypatch.setattr(inv, "load", broken)
    r = runner.invoke(main, ["check"])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert "piimage: internal error: KeyError: " in r.output and "\x1b" not in r.output
    assert "\\x1b[31m" in r.output and "run with -vv" in r.output
