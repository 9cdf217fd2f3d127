"""Stage loading and per-node planning: pure, no image."""

from pathlib import Path

import pytest

from piimage.errors import UserError
from piimage.stages import discover, load_stage, plan_node

REPO = Path(__file__).resolve().parents[2]


def write_stage(root: Path, name: str, yaml_text: str, files: dict[str, str] | None = None) -> Path:
    d = root / name
    (d / "files").mkdir(parents=True)
    (d / "stage.yaml").write_text(yaml_text)
    for k, v in (files or {}).items():
        (d / "files" / k).write_text(v)
    return d


def ctx(**over):
    c = {
        "cluster": {"name": "c", "timezone": "Etc/UTC"},
        "node": {"hostname": "n1", "ip": "10.0.0.11"},
        "nodes": [{"hostname": "n1", "ip": "10.0.0.11"}],
        "admin": {"name": "admin", "home": "/home/admin", "ssh_authorized_keys": []},
    }
    c.update(over)
    return c


def test_repo_stages_load():
    stages = discover([REPO / "stages"])
    names = [s.name for s in stages]
    assert names == sorted(names)
    assert "10-identity" in names


def test_plan_renders_files_modes_and_when(tmp_path):
    write_stage(
        tmp_path,
        "10-a",
        """
scope: node
files:
  - {path: "/etc/{{ node.hostname }}.conf", template: a.j2, mode: "0600"}
  - {path: /etc/keys, template: a.j2, when: admin.ssh_authorized_keys}
  - {path: /etc/blob, secret: k}
links: [{path: /etc/localtime, target: "/usr/share/zoneinfo/{{ cluster.timezone }}"}]
enable: [x.service]
""",
        {"a.j2": "host={{ node.hostname }}\n"},
    )
    plan = plan_node(
        discover([tmp_path]), ctx(), hostname="n1", role="compute", secrets={"k": b"\x00\x01"}
    )
    files = {f.path: f for f in plan.files}
    assert files["/etc/n1.conf"].data == b"host=n1\n"
    assert files["/etc/n1.conf"].mode == 0o600
    assert "/etc/keys" not in files  # when: false
    assert files["/etc/blob"].data == b"\x00\x01" and files["/etc/blob"].secret
    assert plan.links[0].target == "/usr/share/zoneinfo/Etc/UTC"
    assert plan.enable == ("x.service",)


def test_missing_variable_is_an_error(tmp_path):
    write_stage(
        tmp_path, "10-a", "files: [{path: /etc/x, template: a.j2}]\n", {"a.j2": "{{ nope }}\n"}
    )
    with pytest.raises(UserError, match="nope"):
        plan_node(discover([tmp_path]), ctx(), hostname="n1", role="compute", secrets={})


def test_role_filter_and_scope(tmp_path):
    write_stage(
        tmp_path,
        "10-head",
        "roles: [head]\nfiles: [{path: /etc/h, template: a.j2}]\n",
        {"a.j2": "h\n"},
    )
    write_stage(tmp_path, "20-role", "scope: role\npackages: [slurmd]\n")
    plan = plan_node(discover([tmp_path]), ctx(), hostname="n1", role="compute", secrets={})
    assert plan.files == ()


def test_bad_stage_reports_every_problem(tmp_path):
    d = write_stage(
        tmp_path,
        "10-bad",
        """
scope: nodes
fles: []
files:
  - {path: /etc/a, template: missing.j2}
  - {path: /etc/b, template: a.j2, source: a.j2}
  - {path: /etc/c, template: a.j2, mode: "rw"}
packages: [x]
""",
        {"a.j2": ""},
    )
    with pytest.raises(UserError) as ei:
        load_stage(d)
    detail = ei.value.detail
    assert "unknown key 'fles' (did you mean 'files'?)" in detail
    assert "scope: 'nodes'" in detail
    assert "missing.j2 does not exist" in detail
    assert "exactly one of template, source, secret" in detail
    assert "mode 'rw'" in detail
    assert "only role-scope stages install packages" in detail


def test_user_stage_overrides_same_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_stage(a, "10-x", "files: [{path: /etc/x, template: t.j2}]\n", {"t.j2": "ours\n"})
    write_stage(b, "10-x", "files: [{path: /etc/x, template: t.j2}]\n", {"t.j2": "theirs\n"})
    plan = plan_node(discover([a, b]), ctx(), hostname="n1", role="compute", secrets={})
    assert plan.files[0].data == b"theirs\n"
