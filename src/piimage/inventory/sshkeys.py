"""OpenSSH public keys in cluster.yaml: key texts and .pub files (private keys refused unread,
never quoted), and the invoking user's own keys for the default cluster and `piimage init`."""

from __future__ import annotations

import base64
import binascii
import os
import pwd
from pathlib import Path

from ..log import log
from .located import _Checker, _resolve_path

KEY_TYPES = {
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}
MAX_KEY_FILE = 64 * 1024


def _split_options(line: str) -> tuple[str, str]:
    """authorized_keys options (`from="…",no-pty`) come before the key type and have no
    whitespace outside double quotes."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif c.isspace() and not quoted:
            return line[:i], line[i:].lstrip()
    return line, ""


def public_key_problem(line: str) -> str | None:
    """Why `line` is not an OpenSSH public key (authorized_keys form), or None if it is one."""
    fields = line.split()
    if fields and fields[0] not in KEY_TYPES and fields[0] != "ssh-dss":
        fields = _split_options(line)[1].split()  # skip options, if any
    if not fields or (fields[0] not in KEY_TYPES and fields[0] != "ssh-dss"):
        return "expected 'ssh-ed25519 AAAA… comment' or another OpenSSH key type"
    kind = fields[0]
    if kind == "ssh-dss":
        return (
            "a DSA key, which current OpenSSH refuses; use an ed25519 key (ssh-keygen -t ed25519)"
        )
    if len(fields) < 2:
        return f"no key data after '{kind}'"
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return "the key data is not valid base64"
    n = int.from_bytes(blob[:4], "big")
    if len(blob) < 4 + n or blob[4 : 4 + n] != kind.encode():
        return f"the key data is not that of a {kind} key (cut short, or pasted from another key?)"
    parts = _ssh_strings(blob)
    if parts is None or not _whole_key(kind, parts):
        return f"the {kind} key data is cut short or damaged (copy the whole line of the .pub file)"
    return None


def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The length-prefixed strings a public key blob is made of (RFC 4253 section 6.6), or
    None when a length runs past the end."""
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            return None
        n = int.from_bytes(blob[i : i + 4], "big")
        if i + 4 + n > len(blob):
            return None
        out.append(blob[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _whole_key(kind: str, parts: list[bytes]) -> bool:
    """The fields each key type has: ed25519 a 32-byte key (RFC 8709), RSA an exponent and a
    modulus of at least 1024 bits (RFC 4253), ECDSA a curve name and a point (RFC 5656); the
    security-key types add an application string."""
    if kind == "ssh-ed25519":
        return len(parts) == 2 and len(parts[1]) == 32
    if kind == "sk-ssh-ed25519@openssh.com":
        return len(parts) == 3 and len(parts[1]) == 32
    if kind == "ssh-rsa":
        return len(parts) == 3 and len(parts[2].lstrip(b"\0")) * 8 >= 1024
    if kind.startswith("ecdsa-sha2-"):
        return len(parts) == 3 and len(parts[2]) >= 65
    if kind.startswith("sk-ecdsa-sha2-"):
        return len(parts) == 4 and len(parts[2]) >= 65
    return len(parts) >= 2


def _looks_like_key_text(entry: str) -> bool:
    """Key text rather than a file path: it starts with a key type, or has several words and
    one is a key type (authorized_keys options first) or the first looks like one (a typo)."""
    words = entry.split()
    if not words:
        return False
    if words[0] in KEY_TYPES or words[0] == "ssh-dss":
        return True
    return len(words) > 1 and (
        words[0].startswith(("ssh-", "ecdsa-", "sk-")) or any(w in KEY_TYPES for w in words)
    )


def _is_private(text: str) -> bool:
    return "PRIVATE KEY-----" in text or text.startswith("PuTTY-User-Key-File")


def _read_key_file(f: Path) -> tuple[list[str], str | None]:
    """The public keys in file `f`, or why there are none to take."""
    try:
        if f.is_dir():
            return [], f"{f} is a directory, not a public key file"
        if f.stat().st_size > MAX_KEY_FILE:
            return [], f"{f} is too large to be a public key file"
        data = f.read_bytes()
    except FileNotFoundError:
        return [], f"key file {f} does not exist"
    except OSError as e:
        return [], f"key file {f} cannot be read ({e.strerror or e})"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = ""
    if _is_private(text) or b"PRIVATE KEY-----" in data:
        # never quote it; say what to give instead
        pub = f if f.name.endswith(".pub") else f.with_name(f.name + ".pub")
        return [], f"{f} is a private key; refusing it (give the public key, {pub})"
    if not text:
        return [], f"{f} is not a text file, so not an OpenSSH public key"
    if text.lstrip().startswith("---- BEGIN SSH2 PUBLIC KEY"):
        return [], f"{f} is in RFC 4716 (PuTTY/SSH2) form; convert it: ssh-keygen -i -f {f}"
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        reason = public_key_problem(line)
        if reason:
            return [], f"{f}: line {n} does not look like an OpenSSH public key ({reason})"
        keys.append(line)
    return keys, None if keys else f"{f} holds no public key"


def _authorized_keys(
    d: dict, path: tuple, ck: _Checker, base_dir: Path, home: Path
) -> tuple[str, ...]:
    entries = (
        ck.text_list(
            d,
            "ssh_authorized_keys",
            path,
            "a public key or a .pub file path",
            "public keys or .pub file paths",
        )
        or []
    )
    keys: list[str] = []
    for p, entry in entries:
        if _is_private(entry) or entry.startswith("-----BEGIN"):
            ck.add(
                p, "this is a private key; give the public key (the .pub file or its text) instead"
            )
        elif _looks_like_key_text(entry):
            lines = [ln.strip() for ln in entry.splitlines() if ln.strip()]
            reasons = [r for r in map(public_key_problem, lines) if r]
            if reasons:
                ck.add(p, f"does not look like an OpenSSH public key ({reasons[0]})")
            else:
                keys.extend(lines)
        else:
            found, problem = _read_key_file(_resolve_path(entry, base_dir, home))
            if problem:
                ck.add(p, problem)
            keys.extend(found)
    return tuple(dict.fromkeys(keys))  # once each, in order


def invoking_home() -> Path:
    """The home of the user who ran the command; through sudo, the one who typed sudo."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != "root":
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path(os.environ.get("HOME") or Path.home())


def default_key_files(home: Path | None = None) -> list[str]:
    """The invoking user's usable public keys as `~/.ssh/id_*.pub` (resolved against that
    user's home at load time); unusable ones are skipped with a warning."""
    ssh = (home or invoking_home()) / ".ssh"
    found = []
    for f in sorted(ssh.glob("id_*.pub")) if ssh.is_dir() else []:
        problem = _read_key_file(f)[1]
        if problem:
            log.warning("not using %s", problem)
        else:
            found.append(f"~/.ssh/{f.name}")
    return found
