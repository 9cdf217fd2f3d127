"""Generated hostile inputs for `piimage check` (issue 13's fuzz): a valid inventory, node
profile and custom stage, each mutated many times over from a fixed seed (values swapped for
other types, huge, negative, secret-looking, with escape sequences, dangerous paths and
subnets; keys dropped or made up; the text cut short or given control characters), every case
run in-process. None may give a traceback, an internal error or a hang; every refusal is exit 2
naming the file (and a line when the file could be parsed); no control character reaches the
terminal; no secret put in the wrong key is echoed. The counts per class are printed (-s).

The file classes of test_inputs.py (FIFOs, /dev/zero, alias bombs, …) are the other half."""

from __future__ import annotations

import copy
import random
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from piimage.cli import main

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"
INVENTORY = {
    "name": "lab",
    "base": "raspios-lite-arm64",
    "network": {"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "dns": ["10.0.0.1"]},
    "admin": {"name": "alice", "ssh_authorized_keys": [KEY]},
    "timezone": "Europe/London",
    "hardware": {"model": "pi4-4gb"},
    "cluster_user": {"name": "mpiuser", "uid": 1500},
    "shared": {"path": "/clusterfs"},
    "stages": ["mystages"],
    "nodes": [
        {"hostname": "head", "role": "head", "ip": "10.0.0.10"},
        {"hostname": "node01", "role": "compute", "ip": "10.0.0.11"},
        {"hostname": "gpu1", "role": "gpu", "ip": "10.0.0.20"},
    ],
}
PROFILE = {
    "description": "a GPU-less gpu role",
    "packages": ["slurmd", "munge", "openmpi-bin"],
    "services": {"enable": ["slurmd.service"], "disable": ["bluetooth.service"]},
    "headroom_mb": 256,
}
STAGE = {
    "description": "extra files",
    "scope": "node",
    "roles": ["all"],
    "files": [{"path": "/etc/extra", "template": "extra.j2", "mode": "0644"}],
    "links": [{"path": "/etc/l", "target": "/x"}],
    "dirs": [{"path": "/srv/d", "mode": "0700", "owner": "root"}],
    "enable": ["a.service"],
    "append": [{"path": "/etc/x", "lines": ["x=1"], "when": "node.slurmd"}],
}
# What a user might paste into the wrong key: none of it may be echoed back.
PASSWORD_HASH = "$6$fuzzsalt$Zq0mN8vY2XlEj3pA9sT1uK7bC4dF6gH5iJ0kL2mN3oP4qR5sT6uV7wX8yZ9aB0cD1eF"
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
SECRETS = (PASSWORD_HASH, "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ")
VALUES = {
    "type": [None, True, 0, -1, 2**70, 3.5, [], {}, [1, 2], {"a": 1}, "", [[[]]], {"x": [None]}],
    "size": ["x" * 5000, ["a"] * 3000, "9" * 400],
    "escape": [
        "\x1b[31mred\x1b[0m",
        "bell\x07",
        "nul\x00byte",
        "cr\rreturn",
        "\x9bcsi",
        "tab\there",
    ],
    "path": ["/", "/etc", "//etc", "/etc/../etc", "../../etc/shadow", "/dev/zero", "~", "a b"],
    "network": ["0.0.0.0/0", "224.0.0.0/24", "127.0.0.0/8", "10.0.0.300", "10.0.0.0/33", "::1"],
    "secret": [PASSWORD_HASH, PRIVATE_KEY],
    "key": [KEY[:40], KEY.replace("AAAA", "!!!!"), "ssh-rsa AAAA", KEY + "\x1b[2J"],
}
CASES = {"inventory": 240, "node profile": 120, "stage": 120}
TEXT_MUTATIONS = ("cut short", "control character", "tab indent", "duplicate key")


def _paths(doc, prefix=()):
    """Every place in a document: (path, value)."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _set(doc, path, value):
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value


def _delete(doc, path):
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    del cur[path[-1]]


def _mutate(rng: random.Random, good: dict) -> tuple[str, str]:
    """(class, text) of one generated case."""
    doc = copy.deepcopy(good)
    places = [p for p, _ in _paths(doc) if p]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        places = [p for p, _ in _paths(doc) if p]
        path = rng.choice(places)
        op = rng.random()
        if op < 0.12:
            cls = "key dropped"
            _delete(doc, path)
        elif op < 0.2:
            cls = "key made up"
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent[rng.choice(["extra", "Name", "nodes ", "\x1b[1mbold"])] = rng.choice(
                    VALUES["type"]
                )
            else:
                parent.append(rng.choice(VALUES["type"]))
        else:
            cls = rng.choice(list(VALUES))
            _set(doc, path, rng.choice(VALUES[cls]))
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, width=200)
    if rng.random() < 0.2:
        cls = rng.choice(TEXT_MUTATIONS)
        lines = text.splitlines(keepends=True)
        if cls == "cut short":
            text = text[: rng.randrange(1, len(text))]
        elif cls == "control character":
            i = rng.randrange(len(lines))
            lines[i] = lines[i].rstrip("\n") + rng.choice(["\x07", "\x1b[2J", "\x00"]) + "\n"
            text = "".join(lines)
        elif cls == "tab indent":
            text = text.replace("  ", "\t", 1)
        else:
            text = text + lines[0]
    return cls, text


def _tree(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "node-profiles").mkdir(exist_ok=True)
    stage = tmp_path / "mystages" / "90-extra"
    (stage / "files").mkdir(parents=True, exist_ok=True)
    (stage / "files" / "extra.j2").write_text("{{ node.hostname }}\n")
    paths = {
        "inventory": tmp_path / "cluster.yaml",
        "node profile": tmp_path / "node-profiles" / "gpu.yaml",
        "stage": stage / "stage.yaml",
    }
    for kind, good in (("inventory", INVENTORY), ("node profile", PROFILE), ("stage", STAGE)):
        paths[kind].write_text(yaml.safe_dump(good, sort_keys=False))
    return paths


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(CASES))
def test_generated_inputs_never_crash_hang_or_echo(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no key or cluster of the machine's own
    paths = _tree(tmp_path)
    good = {"inventory": INVENTORY, "node profile": PROFILE, "stage": STAGE}[kind]
    assert CliRunner().invoke(main, ["check"]).exit_code == 0  # the unmutated tree is fine
    rng = random.Random(f"piimage-fuzz-{kind}")
    seen: Counter = Counter()
    bad = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for n in range(CASES[kind]):
            cls, text = _mutate(rng, good)
            paths[kind].write_text(text, encoding="utf-8", errors="surrogateescape")
            signal.alarm(10)
            try:
                r = CliRunner().invoke(main, ["check"])
            except _Hang:
                bad.append(f"case {n} ({cls}): hung over 10 s\n{text[:500]}")
                continue
            finally:
                signal.alarm(0)
            seen[cls, r.exit_code] += 1
            problem = _problem(r, paths[kind], text)
            if problem:
                bad.append(f"case {n} ({cls}): {problem}\n--- input:\n{text[:800]}")
    finally:
        signal.signal(signal.SIGALRM, old)
    print(
        f"\nfuzz {kind}: " + ", ".join(f"{c} exit {e}: {k}" for (c, e), k in sorted(seen.items()))
    )
    assert not bad, f"{len(bad)} of {CASES[kind]} cases went wrong:\n\n" + "\n\n".join(bad[:5])
    # the mutations did reach the checks: most cases are refused
    assert sum(k for (_, e), k in seen.items() if e == 2) > CASES[kind] // 3, seen


def _problem(r, target: Path, text: str) -> str | None:
    out = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return f"exception {r.exception!r}"
    if r.exit_code not in (0, 2):
        return f"exit {r.exit_code}: {out[-600:]}"
    if "Traceback" in out or "internal error" in out:
        return f"traceback or internal error: {out[-600:]}"
    raw = [c for c in out if not c.isprintable() and c != "\n"]
    if raw:
        return f"raw control characters {raw[:5]!r} in {out[-600:]!r}"
    leaked = [s[:12] for s in SECRETS if s in out]
    if leaked:
        return f"a secret echoed ({leaked}): {out[-600:]}"
    if r.exit_code == 2:
        if target.name not in out:
            return f"refused without naming {target.name}: {out[-600:]}"
        parsed = _parses(text)
        if parsed and not re.search(rf"{re.escape(target.name)}:\d+", out):
            return f"refused without a line number: {out[-600:]}"
    return None


def _parses(text: str) -> bool:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True
