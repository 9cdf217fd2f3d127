"""Hostile input files, through the one door every input goes through (yamlloc.read_text_file
and yamlloc.read): for the inventory, a node profile and a custom stage, each class of file that
once gave a traceback, a hang or gigabytes of memory must give exit 2 and one located line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from piimage.cli import main

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"
GOOD = f"""\
name: lab
network: {{subnet: 10.0.0.0/24, gateway: 10.0.0.1}}
admin: {{name: alice, ssh_authorized_keys: ['{KEY}']}}
stages: [mystages]
nodes:
  - {{hostname: head, role: head, ip: 10.0.0.10}}
  - {{hostname: node01, role: compute, ip: 10.0.0.11}}
  - {{hostname: gpu1, role: gpu, ip: 10.0.0.20}}
"""
PROFILE = "packages: [slurmd, munge, openmpi-bin]\n"
STAGE = "scope: node\nroles: [all]\nfiles: []\n"


def _bomb(levels=9, width=9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# class -> how to make the file at `path` (good text for that kind given)
CLASSES = {
    "alias bomb": lambda p, good: p.write_text(good + _bomb()),
    "recursive alias": lambda p, good: p.write_text(good + "loop: &l [*l]\n"),
    "deep nesting": lambda p, good: p.write_text(good + "deep: " + "[" * 400 + "]" * 400 + "\n"),
    "control character": lambda p, good: p.write_text(good + "# a bell \x07 in a comment\n"),
    # a YAML escape: legal YAML, an ESC character in a value the error message quotes
    "escape in a value": lambda p, good: p.write_text(
        good.replace("name: lab", 'name: "l\\e[31mab"')
        .replace("packages: [slurmd", 'packages: ["sl\\e[31murmd"')
        .replace("roles: [all]", 'roles: ["a\\e[31mll"]')
    ),
    "50 MB": lambda p, good: p.write_text(good + "#" * 50_000_000 + "\n"),
    "not UTF-8": lambda p, good: p.write_bytes(good.encode() + b"# caf\xe9\n"),
    "a FIFO": lambda p, good: os.mkfifo(p),
    "/dev/zero": lambda p, good: p.symlink_to("/dev/zero"),
    "a directory": lambda p, good: p.mkdir(),
    "a broken link": lambda p, good: p.symlink_to(p.parent / "nowhere.yaml"),
    "a link loop": lambda p, good: (
        p.symlink_to(p.parent / "loop2"),
        (p.parent / "loop2").symlink_to(p),
    ),
}
KINDS = ("inventory", "node profile", "stage")


def _tree(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "node-profiles").mkdir()
    (tmp_path / "node-profiles" / "gpu.yaml").write_text(PROFILE)
    (tmp_path / "mystages" / "90-extra").mkdir(parents=True)
    (tmp_path / "mystages" / "90-extra" / "stage.yaml").write_text(STAGE)
    (tmp_path / "cluster.yaml").write_text(GOOD)
    return {
        "inventory": tmp_path / "cluster.yaml",
        "node profile": tmp_path / "node-profiles" / "gpu.yaml",
        "stage": tmp_path / "mystages" / "90-extra" / "stage.yaml",
    }


def test_the_good_tree_passes(tmp_path, monkeypatch):
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 0, r.output
    assert "90-extra" in r.output  # check reads the custom stages a build would use


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_hostile_file_is_one_located_error(tmp_path, monkeypatch, kind, cls):
    paths = _tree(tmp_path)
    target = paths[kind]
    good = target.read_text()
    target.unlink()
    CLASSES[cls](target, good)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["check"])
    out = r.output
    assert r.exit_code == 2, f"{kind} / {cls}: exit {r.exit_code}\n{out}\n{r.exception!r}"
    assert "Traceback" not in out and "internal error" not in out
    # nothing raw reaches the terminal: no control character but the newline
    assert not [c for c in out if not c.isprintable() and c != "\n"], repr(out)
    # the message names the file it is about
    assert target.name in out or str(target) in out, out
    assert len(out) < 4000, out[:4000]


@pytest.mark.parametrize(
    "entry", ["{path: /x, source: /etc/shadow}", "{path: /x, template: ../stage.yaml}"]
)
def test_a_stage_cannot_copy_files_from_outside_its_folder(tmp_path, entry):
    from piimage import build
    from piimage import inventory as inv

    _tree(tmp_path)
    stage = tmp_path / "mystages" / "90-extra"
    (stage / "files").mkdir()
    (stage / "stage.yaml").write_text(f"scope: node\nroles: [all]\nfiles:\n  - {entry}\n")
    cluster = inv.load(tmp_path / "cluster.yaml")
    keys = build.cluster_keys(cluster)
    with pytest.raises(Exception) as e:
        build.plan(cluster, cluster.nodes, keys=keys, out_dir=tmp_path / "out")
    said = f"{e.value} {getattr(e.value, 'detail', '')}"
    assert "is outside the stage's files/ folder" in said, said
    assert "root:" not in said  # nothing of /etc/shadow


def test_a_secrets_dir_every_user_can_write_is_refused(tmp_path, monkeypatch):
    _tree(tmp_path)
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    text = (
        (tmp_path / "cluster.yaml")
        .read_text()
        .replace("name: lab\n", "name: lab\nsecrets_dir: open\n")
    )
    (tmp_path / "cluster.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 2
    assert f"cluster.yaml:2: secrets_dir: {shared} is writable by every user" in r.output


def test_check_renders_what_a_build_would_render(tmp_path, monkeypatch):
    """`check` plans every node as `build` does (stand-in keys, nothing written): a stage that
    would fail at render time fails `check`, and a cluster of a head alone renders (the
    example jobs once failed on it: `min` of no compute nodes)."""
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    inv = tmp_path / "cluster.yaml"
    inv.write_text(GOOD.split("  - {hostname: node01")[0])
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / ".piimage").exists() and not (tmp_path / "out").exists()
    stage = tmp_path / "mystages" / "90-extra"
    (stage / "files").mkdir()
    (stage / "files" / "t.j2").write_text("{{ no_such_thing.x }}\n")
    (stage / "stage.yaml").write_text(
        "scope: node\nroles: [all]\nfiles:\n  - {path: /etc/x, template: t.j2}\n"
    )
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 2, r.output
    assert "90-extra/stage.yaml:4: files[0]" in r.output and "no_such_thing" in r.output
