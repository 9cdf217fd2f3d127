"""The stage action registry: each action's keys, its `when:`, and where its errors point."""

from pathlib import Path

import pytest

from piimage import actions, stages
from piimage.errors import UserError
from piimage.profiles import load_profile
from piimage.stages import ACTIONS, discover, load_stage, plan_node

# The schema as documented at the top of stages.py; a change here is a change users see.
KEYS = {
    "files": {"path", "template", "source", "secret", "mode", "owner", "group", "when"},
    "links": {"path", "target", "when"},
    "dirs": {"path", "mode", "owner", "group", "when"},
    "users": {"name", "uid", "home", "shell", "groups", "when"},
    "append": {"path", "section", "lines", "when"},
    "remove": {"name", "when"},
    "enable": {"name", "when"},
    "disable": {"name", "when"},
    "mask": {"name", "when"},
}
# One valid entry per action (flow style, one line) and what it puts in the plan.
ENTRY = {
    "files": ("{path: /etc/x, template: t.j2}", lambda p: [f.path for f in p.files] == ["/etc/x"]),
    "links": ("{path: /etc/l, target: /x}", lambda p: p.links[0].target == "/x"),
    "dirs": ("{path: /srv/d, mode: '0700'}", lambda p: p.dirs[0].mode == 0o700),
    "users": ("{name: u, uid: 1500}", lambda p: p.users[0].home == "/home/u"),
    "append": ("{path: /etc/a, lines: [x=1]}", lambda p: p.append[0].lines == ("x=1",)),
    "remove": ("/etc/gone*", lambda p: p.remove == ("/etc/gone*",)),
    "enable": ("a.service", lambda p: p.enable == ("a.service",)),
    "disable": ("b.service", lambda p: p.disable == ("b.service",)),
    "mask": ("c.service", lambda p: p.mask == ("c.service",)),
}
CTX = {"node": {"hostname": "n1"}, "flag": True, "off": False}


def stage(root: Path, text: str, name: str = "10-a") -> Path:
    d = root / name
    (d / "files").mkdir(parents=True)
    (d / "files" / "t.j2").write_text("{{ node.hostname }}\n")
    (d / "stage.yaml").write_text(text)
    return d


def plan(root: Path, **kw):
    return plan_node(discover([root]), CTX, hostname="n1", role="compute", secrets={}, **kw)


def problems(d: Path) -> str:
    with pytest.raises(UserError) as ei:
        load_stage(d)
    return ei.value.detail or ei.value.message


def test_every_action_is_registered_once_with_its_keys():
    assert {a.key: a.allowed() for a in ACTIONS} == KEYS
    assert len({a.key for a in ACTIONS}) == len(ACTIONS)
    # each writes its own entries into an image (the stamp knows no action by name) ...
    assert all(a.write.__func__ is not actions.Action.write.__func__ for a in ACTIONS)
    # ... and a plan has the entries of every one, by key
    plan = plan_node([], CTX, hostname="n1", role="compute", secrets={})
    assert set(plan.items) == set(KEYS) and all(getattr(plan, k) == () for k in KEYS)
    with pytest.raises(AttributeError):
        plan.nonsense  # noqa: B018
    assert stages.STAGE_KEYS == {"scope", "roles", "packages", "description", *KEYS}


@pytest.mark.parametrize("key", sorted(KEYS))
def test_action_renders_and_when_filters(tmp_path, key):
    entry, check = ENTRY[key]
    stage(tmp_path, f"{key}:\n  - {entry}\n")
    assert check(plan(tmp_path))
    for when, kept in (("flag", True), ("off", False), ("node.hostname == 'n2'", False)):
        body = entry[1:-1] if entry.startswith("{") else f"name: {entry}"
        (tmp_path / "10-a" / "stage.yaml").write_text(f'{key}:\n  - {{{body}, when: "{when}"}}\n')
        p = plan(tmp_path)
        if kept:
            assert check(p), (key, when)
        else:
            assert getattr(p, key) == (), (key, when)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_unknown_key_is_located(tmp_path, key):
    entry, _ = ENTRY[key]
    body = entry[1:-1] if entry.startswith("{") else f"name: {entry}"
    d = stage(tmp_path, f"description: x\n{key}:\n  - {{{body}}}\n  - {{{body}, wehn: x}}\n")
    detail = problems(d)
    assert f"10-a/stage.yaml:4: {key}[1].wehn: unknown key 'wehn' (did you mean 'when'?)" in detail


NAME_LISTS = ("remove", "enable", "disable", "mask")


@pytest.mark.parametrize("key", sorted(k for k in KEYS if k not in NAME_LISTS))
def test_missing_required_key_is_located(tmp_path, key):
    d = stage(tmp_path, f"{key}:\n  - {{when: x}}\n")
    required = next(a for a in ACTIONS if a.key == key).required()
    wanted = " and ".join(map(repr, required))
    assert f"10-a/stage.yaml:2: {key}[0]: expected a mapping with {wanted}" in problems(d)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_role_scope_stage_refuses_actions(tmp_path, key):
    entry, _ = ENTRY[key]
    d = stage(tmp_path, f"scope: role\npackages: [slurmd]\n{key}:\n  - {entry}\n")
    detail = problems(d)
    assert f"10-a/stage.yaml:3: {key}: role-scope stages take only" in detail
    assert "put it in a node-scope stage" in detail


def test_role_scope_stage_with_packages_and_files_dir_loads(tmp_path):
    d = stage(tmp_path, "scope: role\nroles: [compute]\npackages: [slurmd]\n")
    st = load_stage(d)
    assert st.packages == ("slurmd",) and st.actions == ()
    assert plan(tmp_path).files == ()  # nothing of a role-scope stage is in a node plan


def test_render_error_names_file_line_and_entry(tmp_path):
    stage(tmp_path, "links:\n  - {path: /a, target: /b}\n  - {path: /c, target: '{{ nope }}'}\n")
    with pytest.raises(UserError, match=r"10-a/stage.yaml:3: links\[1\]: cannot render"):
        plan(tmp_path)


def test_later_entry_replaces_earlier_by_path_names_are_deduplicated(tmp_path):
    stage(
        tmp_path,
        "files:\n  - {path: /etc/x, template: t.j2}\n  - {path: /etc/x, source: t.j2}\n"
        "enable: [a.service, b.service, a.service]\nremove: [/x, /x]\n",
    )
    p = plan(tmp_path)
    assert [f.data for f in p.files] == [b"{{ node.hostname }}\n"]  # the copy, not the render
    assert p.enable == ("a.service", "b.service")
    assert p.remove == ("/x", "/x")


def test_yaml_problems_are_located(tmp_path):
    d = stage(tmp_path, "description: a\nfiles: []\ndescription: b\n")
    assert "10-a/stage.yaml:3: description: given twice (also at line 1)" in problems(d)
    (d / "stage.yaml").write_text("files:\n  - {path: /x\n")
    with pytest.raises(UserError, match=r"stage.yaml:\d+:\d+: malformed YAML"):
        load_stage(d)


def test_not_a_list(tmp_path):
    d = stage(tmp_path, "enable: ssh.service\nfiles: {path: /x}\n")
    detail = problems(d)
    assert "stage.yaml:1: enable: expected a list, got text" in detail
    assert "stage.yaml:2: files: expected a list, got a mapping" in detail


def test_profile_problems_are_located(tmp_path):
    p = tmp_path / "compute.yaml"
    p.write_text(
        "packages:\n  - munge\n  - Not_A_Package\n"
        "services: {enable: [], disabel: []}\nheadroom_mb: -1\n"
    )
    with pytest.raises(UserError) as ei:
        load_profile(p)
    detail = ei.value.detail
    assert "compute.yaml:3: packages[1]: 'Not_A_Package' is not a Debian package name" in detail
    assert "compute.yaml:4: services.disabel: unknown key 'disabel' (did you mean" in detail
    assert "compute.yaml:5: headroom_mb: expected a whole number of MiB ≥ 0, got -1" in detail
