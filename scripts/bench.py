"""The measurements behind scripts/bench; prints figures, asserts nothing."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--suite", default="bookworm", choices=["bookworm", "trixie"])
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--rehearse", type=int, metavar="N", default=0,
                    help="instead: build head + N compute nodes (role layers from the machine's cache) "
                         "and time `piimage rehearse` on them")
    ap.add_argument("--flash", type=Path, metavar="IMAGE",
                    help="instead: time `piimage flash` of IMAGE (with its .bmap) onto a loop "
                         "device against `bmaptool copy` and `dd` onto the same kind of device")
    a = ap.parse_args()
    if a.rehearse:
        return bench_rehearse(a)
    if a.flash:
        return bench_flash(a.flash)
    scratch = Path(tempfile.mkdtemp(prefix="piimage-bench-"))
    try:
        pub = scratch / "standin"
        sh([str(ROOT / "scripts" / "standin-image"), "--suite", a.suite, "--out", str(pub)])
        base = pub / f"raspios-standin-{a.suite}-arm64-lite.img.xz"
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
    finally:
        if a.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def bench_rehearse(a) -> None:
    """Boot and readiness figures of `piimage rehearse` for head + N compute nodes."""
    import json

    scratch = Path(tempfile.mkdtemp(prefix="piimage-bench-"))
    try:
        pub = scratch / "standin"
        sh([str(ROOT / "scripts" / "standin-image"), "--suite", a.suite, "--out", str(pub)])
        base = pub / f"raspios-standin-{a.suite}-arm64-lite.img.xz"
        machine_cache = Path(os.environ.get("PIIMAGE_CACHE", Path.home() / ".cache" / "piimage"))
        env = dict(os.environ, PIIMAGE_CACHE=str(scratch / "cache"),
                   PIIMAGE_LAYER_CACHE=str(machine_cache / "layers"),
                   PIIMAGE_APT_CACHE=str(machine_cache / "apt-archives"))
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
    finally:
        if a.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)



def bench_flash(image: Path) -> None:
    """piimage flash against bmaptool copy and dd, each onto its own fresh loop device over a
    sparse file with direct I/O (writes reach the file as a card's reach the card)."""
    scratch = Path(tempfile.mkdtemp(prefix="piimage-bench-flash-"))
    size = image.stat().st_size
    devs = []

    def card(name: str) -> str:
        f = scratch / name
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

    try:
        sh(["sync"])
        t_pi, out = run_timed([sys.executable, "-m", "piimage.cli", "flash", str(image),
                               card("piimage"), "--yes", "--allow-fixed"])
        m = re.search(r"written in ([\d.]+) s, read back and checked in ([\d.]+) s", out)
        w, v = (float(m.group(1)), float(m.group(2))) if m else (float("nan"),) * 2
        t_bmap, _ = run_timed(["bmaptool", "copy", "--bmap", f"{image}.bmap", str(image),
                               card("bmaptool")])
        t_dd, _ = run_timed(["dd", f"if={image}", f"of={card('dd')}", "bs=4M", "oflag=direct",
                             "conv=fsync", "status=none"])
        print(f"image: {image.name}, {size / 2**30:.2f} GiB; targets: loop devices, direct I/O")
        print(f"piimage flash (write + read back):  {t_pi:7.1f} s  (write {w:.1f} s, read back {v:.1f} s)")
        print(f"bmaptool copy (write):              {t_bmap:7.1f} s")
        print(f"dd bs=4M oflag=direct (all of it):  {t_dd:7.1f} s")
        print(f"ratio piimage write / bmaptool:     {w / t_bmap:7.2f}   (goal: within 1.10)")
        print(f"ratio piimage in all / bmaptool:    {t_pi / t_bmap:7.2f}")
        print(f"ratio piimage in all / dd:          {t_pi / t_dd:7.2f}")
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
