"""The measurements behind scripts/bench; prints figures, asserts nothing."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool, parent: str | None = None):
    """A scratch folder for one bench, removed after it unless --keep."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield scratch
    finally:
        if keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def cluster_yaml(base: Path, computes: int) -> str:
    nodes = "\n".join(f"  - {{hostname: node{i:02d}, role: compute, ip: 10.0.0.{10 + i}}}" for i in range(1, computes + 1))
    return (f"name: bench{computes}\nbase: {base}\nnetwork: {{subnet: 10.0.0.0/24, gateway: 10.0.0.1}}\n"
            f"nodes:\n  - {{hostname: head, role: head, ip: 10.0.0.10}}\n{nodes}\n")


def timed(args, cwd, env) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "piimage.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"piimage {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return dt, r.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=["bookworm", "trixie"],
                    help="the stand-in's release (bookworm; trixie for --north-star)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--rehearse", type=int, metavar="N", default=0,
                    help="instead: build head + N compute nodes (role layers from the machine's cache) "
                         "and time `piimage rehearse` on them")
    ap.add_argument("--flash", type=Path, metavar="IMAGE",
                    help="instead: time `piimage flash` of IMAGE (with its .bmap) onto a loop "
                         "device against `bmaptool copy` and `dd` onto the same kind of device")
    ap.add_argument("--repeat", type=int, default=5, metavar="N",
                    help="with --flash: rounds of the three writes (default 5)")
    ap.add_argument("--north-star", type=int, metavar="N", nargs="?", const=8, default=0,
                    help="instead: the whole path a user takes, timed in parts: piimage init, "
                         "the inventory edited to head + N compute nodes (8), build --all with the "
                         "defaults (cold role layers, the base already downloaded), rehearse of "
                         "every node (default suite: trixie, what init's base is)")
    a = ap.parse_args()
    if a.north_star:
        return bench_north_star(a)
    a.suite = a.suite or "bookworm"
    if a.rehearse:
        return bench_rehearse(a)
    if a.flash:
        return bench_flash(a.flash, a.repeat)
    with scratch_dir("piimage-bench-", a.keep) as scratch:
        base = standin_base(a.suite, scratch)
        env = dict(os.environ, PIIMAGE_CACHE=str(scratch / "cache"))  # fresh: layers are built cold
        for n in (1, 8):
            d = scratch / f"c{n}"
            d.mkdir()
            (d / "cluster.yaml").write_text(cluster_yaml(base, n))
        print(f"stand-in: {a.suite}, {os.cpu_count()} cores", flush=True)
        t_first, err = timed(["build", "--hostname", "node01", "--compress", "none"], scratch / "c1", env)
        layer = re.search(r"role layer compute: built in (\d+) s", err)
        print(f"first build of node01 (download/decompress + compute role layer + stamp): {t_first:7.1f} s")
        print(f"  of which the compute role layer (apt under emulation):                {float(layer.group(1)) if layer else float('nan'):7.1f} s")
        t_stamp, _ = timed(["build", "--hostname", "node01", "--compress", "none"], scratch / "c1", env)
        print(f"node stamp from the cached layer (one node, raw .img + .bmap):           {t_stamp:7.1f} s")
        t1, _ = timed(["build", "--all", "--role", "compute", "--compress", "none"], scratch / "c1", env)
        print(f"--all, 1 compute node:                                                   {t1:7.1f} s")
        t8, _ = timed(["build", "--all", "--role", "compute", "--compress", "none"], scratch / "c8", env)
        print(f"--all, 8 compute nodes:                                                  {t8:7.1f} s")
        print(f"ratio 8 nodes / 1 node:                                                  {t8 / t1:7.2f}")
        img = scratch / "c8" / "out" / "bench8" / "node01.img"
        t0 = time.monotonic()
        subprocess.run(
            ["xz", "-T0", "-3", "-c", str(img)], stdout=subprocess.DEVNULL, check=True)
        t_xz = time.monotonic() - t0
        t_c, _ = timed(["build", "--hostname", "node01", "--compress", "xz"], scratch / "c8", env)
        print(f"xz -T0 -3 alone on node01.img:                                           {t_xz:7.1f} s")
        print(f"build --hostname node01 --compress xz (stamp + xz):                      {t_c:7.1f} s "
              f"(stamp alone {t_stamp:.1f} s; compression share {(t_c - t_stamp) / t_xz:.2f}× xz alone)")


def standin_base(suite: str, scratch: Path) -> Path:
    """The stand-in image of `suite` published into the scratch folder (built or cached by
    scripts/standin-image): a local file, as a downloaded base is."""
    pub = scratch / "standin"
    sh([str(ROOT / "scripts" / "standin-image"), "--suite", suite, "--out", str(pub)])
    return pub / f"raspios-standin-{suite}-arm64-lite.img.xz"


def scratch_env(scratch: Path, layers: Path) -> dict[str, str]:
    """piimage's environment for a bench: downloads and the decompressed base in the scratch
    cache, role layers in `layers`, apt's archive the machine's."""
    machine_cache = Path(os.environ.get("PIIMAGE_CACHE", Path.home() / ".cache" / "piimage"))
    return dict(os.environ, PIIMAGE_CACHE=str(scratch / "cache"),
                PIIMAGE_LAYER_CACHE=str(layers),
                PIIMAGE_APT_CACHE=str(machine_cache / "apt-archives"))


def bench_rehearse(a) -> None:
    """Boot and readiness figures of `piimage rehearse` for head + N compute nodes."""
    import json

    with scratch_dir("piimage-bench-", a.keep) as scratch:
        base = standin_base(a.suite, scratch)
        machine_cache = Path(os.environ.get("PIIMAGE_CACHE", Path.home() / ".cache" / "piimage"))
        env = scratch_env(scratch, machine_cache / "layers")  # role layers from the machine's
        d = scratch / "c"
        d.mkdir()
        (d / "cluster.yaml").write_text(cluster_yaml(base, a.rehearse))
        print(f"stand-in: {a.suite}, {os.cpu_count()} cores, head + {a.rehearse} compute nodes", flush=True)
        t_build, _ = timed(["build", "--all", "--compress", "none"], d, env)
        print(f"build --all --compress none:                      {t_build:7.1f} s")
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "piimage.cli", "rehearse", "--json"], cwd=d, env=env,
                           capture_output=True, text=True)
        t_all = time.monotonic() - t0
        report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
        if report is None:
            sys.exit(f"piimage rehearse printed no report (exit {r.returncode}):\n{r.stderr[-3000:]}")
        kernel = re.search(r"rehearsal kernel: .*", r.stderr)
        print(f"rehearse, in all (kernel fetch, overlays, boot, checks, teardown): {t_all:7.1f} s  "
              f"(exit {r.returncode}, {'passed' if report['ok'] else 'FAILED'})")
        print(f"  {kernel.group(0) if kernel else ''}")
        for node, s in report["boot_seconds"].items():
            print(f"  boot {node:<10} {s:7.1f} s")
        print(f"  cluster ready after    {report['ready_seconds'] or float('nan'):7.1f} s")
        for c in report["checks"]:
            if c["seconds"]:
                print(f"  check {c['name']:<8} {c['node']:<10} {c['seconds']:6.1f} s  {'ok' if c['ok'] else 'FAILED'}")



def logged(args, cwd, env) -> tuple[float, int, list[tuple[float, str]]]:
    """Run piimage; every line of its log with the second it arrived (from the start)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "piimage.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [(time.monotonic() - t0, ln.rstrip("\n")) for ln in proc.stderr]
    out = proc.stdout.read()
    rc = proc.wait()
    lines.append((time.monotonic() - t0, f"(exit {rc})"))
    lines.extend((time.monotonic() - t0, "stdout: " + ln) for ln in out.splitlines())
    return time.monotonic() - t0, rc, lines


def _span(lines, start: str, end: str | None = None, last: bool = False) -> float | None:
    """Seconds from the (first) line containing `start` to the next line (or the first after
    it containing `end`; with `last`, the last such line)."""
    for i, (t, ln) in enumerate(lines):
        if start in ln:
            after = [(u, m) for u, m in lines[i + 1:] if end is None or end in m]
            if after:
                return (after[-1] if last else after[0])[0] - t
    return None


def _fmt(x: float | None) -> str:
    return f"{x:7.1f} s" if x is not None else "      - "


def bench_north_star(a) -> None:
    """From `piimage init` to a rehearsed head + N compute images, each part timed."""
    import json

    suite = a.suite or "trixie"
    n = a.north_star
    budget = 600.0
    with scratch_dir("piimage-bench-north-", a.keep, "/var/tmp") as scratch:
        base = standin_base(suite, scratch)  # downloaded: a local file
        # cold: the decompressed base and role layers in the scratch folder; apt's archive is
        # the machine's (a user's second cluster has it too; the first downloads)
        env = scratch_env(scratch, scratch / "layers")
        d = scratch / "c"
        d.mkdir()
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(scratch / "admin")])
        print(f"north star: stand-in {suite}, {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
              f"head + {n} compute nodes, scratch {scratch}", flush=True)
        parts: list[tuple[str, float | None]] = []
        t_init, rc, _ = logged(["init"], d, env)
        if rc:
            sys.exit("piimage init failed")
        parts.append(("piimage init", t_init))
        text = (d / "cluster.yaml").read_text()
        text = re.sub(r"(?m)^base: \S+", f"base: {base}", text)
        text = re.sub(r"(?m)^  ssh_authorized_keys:.*$",
                      f"  ssh_authorized_keys: [{scratch / 'admin.pub'}]", text)
        text = re.sub(r"(?m)^nodes:\n(  - .*\n)+", "", text)
        subnet = re.search(r"subnet: (\d+\.\d+\.\d+)\.0/24", text).group(1)
        text += "nodes:\n" + f"  - {{hostname: head, role: head, ip: {subnet}.10}}\n" + "".join(
            f"  - {{hostname: node{i:02d}, role: compute, ip: {subnet}.{10 + i}}}\n"
            for i in range(1, n + 1))
        (d / "cluster.yaml").write_text(text)

        t_build, rc, lines = logged(["build", "--all"], d, env)
        (scratch / "build.log").write_text("".join(f"{t:8.1f} {ln}\n" for t, ln in lines))
        if rc:
            sys.exit("build --all failed:\n" + "\n".join(ln for _, ln in lines[-40:]))
        parts.append(("build --all (defaults)", t_build))
        log = [ln for _, ln in lines]
        print(f"build --all with the defaults:          {_fmt(t_build)}")
        print(f"  base decompress                       {_fmt(_span(lines, 'decompressing'))}")
        for m in re.finditer(r"role layer (\S+): built in (\d+) s", "\n".join(log)):
            print(f"  role layer {m.group(1):<27} {_fmt(float(m.group(2)))}")
        first_stamp = _span(lines, "starting the libguestfs appliance", "stamping", last=True)
        print(f"  appliance launch to the last stamp    {_fmt(first_stamp)}")
        print(f"  first image written to the end        "
              f"{_fmt(_span(lines, 'writing ', 'built ', last=True))}")
        packed = [float(m.group(1)) for m in re.finditer(r"compressed \S+ in (\d+) s", "\n".join(log))]
        if packed:
            print(f"  compression: {len(packed)} images, {sum(packed):.0f} s in all "
                  f"(min {min(packed):.0f}, max {max(packed):.0f} s each, side by side with the rest)")
        else:
            print("  compression: none (the default writes raw images)")

        t_reh, rc, lines = logged(["rehearse", "--json"], d, env)
        (scratch / "rehearse.log").write_text("".join(f"{t:8.1f} {ln}\n" for t, ln in lines))
        parts.append(("rehearse (all nodes)", t_reh))
        out = "\n".join(ln[8:] for _, ln in lines if ln.startswith("stdout: "))
        report = json.loads(out) if out.strip().startswith("{") else None
        print(f"rehearse of {n + 1} nodes:                   {_fmt(t_reh)}  (exit {rc}, "
              f"{'passed' if report and report['ok'] else 'FAILED'})")
        print(f"  kernel and overlays, to power-on      {_fmt(_span(lines, 'rehearse', 'booting'))}")
        if report:
            for node, secs in report["boot_seconds"].items():
                ons = len(report.get("boot_cmdlines", {}).get(node, []))
                print(f"  boot {node:<10} {_fmt(secs)}  ({ons} power-on{'s' if ons != 1 else ''}: "
                      f"{'first boot, its reboot, the second boot' if ons > 1 else 'one boot'})")
            print(f"  cluster ready after                   {_fmt(report['ready_seconds'])}")
            checks = sum(c["seconds"] or 0 for c in report["checks"])
            failed = [f"{c['name']}@{c['node']}" for c in report["checks"] if not c["ok"]]
            print(f"  checks, {len(report['checks'])} (one after another):      {_fmt(checks)}"
                  + (f"  failed: {', '.join(failed)}" if failed else ""))
        total = sum(t for _, t in parts if t)
        print(f"total, init to a rehearsed cluster:     {_fmt(total)}  "
              f"(goal {budget:.0f} s: {'within' if total <= budget else f'{total - budget:.0f} s over'})")
        for name, t in parts:
            print(f"  {name:<36} {_fmt(t)}  {100 * (t or 0) / total:4.0f} %")
        print(f"logs with the second of each line: {scratch}/build.log, {scratch}/rehearse.log")


def bench_flash(image: Path, repeat: int) -> None:
    """piimage flash against bmaptool copy and dd, each onto its own fresh loop device over a
    sparse file with direct I/O (writes reach the file as a card's reach the card), `repeat`
    rounds with the order turned each round (a loop device's figures vary by a third from one
    write to the next: one round says little); min and median of each, and the ratios."""
    import statistics

    scratch = Path(tempfile.mkdtemp(prefix="piimage-bench-flash-"))
    size = image.stat().st_size
    devs = []

    def card(name: str) -> str:
        f = scratch / name
        f.unlink(missing_ok=True)
        with open(f, "wb") as fh:
            fh.truncate(size + (64 << 20))
        dev = sh(["losetup", "--find", "--show", "--direct-io=on", str(f)]).stdout.strip()
        devs.append(dev)
        return dev

    def run_timed(cmd) -> tuple[float, str]:
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        return time.monotonic() - t0, r.stdout

    def piimage() -> None:
        t, out = run_timed([sys.executable, "-m", "piimage.cli", "flash", str(image),
                            card("piimage"), "--yes", "--allow-fixed"])
        m = re.search(r"written in ([\d.]+) s, read back and checked in ([\d.]+) s", out)
        w, v = (float(m.group(1)), float(m.group(2))) if m else (float("nan"),) * 2
        figures["piimage flash, in all"].append(t)
        figures["piimage flash, write"].append(w)
        figures["piimage flash, read back"].append(v)

    def bmaptool() -> None:
        t, _ = run_timed(["bmaptool", "-q", "copy", "--bmap", f"{image}.bmap", str(image),
                          card("bmaptool")])
        figures["bmaptool copy (write)"].append(t)

    def dd() -> None:
        t, _ = run_timed(["dd", f"if={image}", f"of={card('dd')}", "bs=4M", "oflag=direct",
                          "conv=fsync", "status=none"])
        figures["dd bs=4M oflag=direct, all"].append(t)

    figures: dict[str, list[float]] = {k: [] for k in (
        "piimage flash, write", "piimage flash, read back", "piimage flash, in all",
        "bmaptool copy (write)", "dd bs=4M oflag=direct, all")}
    order = [piimage, bmaptool, dd]
    try:
        for i in range(repeat):
            for step in order[i % 3:] + order[:i % 3]:
                sh(["sync"])
                step()
                while devs:
                    subprocess.run(["losetup", "-d", devs.pop()], check=False)
        print(f"image: {image.name}, {size / 2**30:.2f} GiB; targets: loop devices, direct I/O; "
              f"{repeat} rounds")
        for name, ts in figures.items():
            print(f"{name:<30} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  "
                  f"({' '.join(f'{t:.2f}' for t in ts)})")
        for a, b, goal in (("piimage flash, write", "bmaptool copy (write)", " (goal: within 1.10)"),
                           ("piimage flash, in all", "bmaptool copy (write)", ""),
                           ("piimage flash, in all", "dd bs=4M oflag=direct, all", "")):
            ra = min(figures[a]) / min(figures[b])
            rm = statistics.median(figures[a]) / statistics.median(figures[b])
            print(f"ratio {a} / {b}: min {ra:.2f}, median {rm:.2f}{goal}")
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
