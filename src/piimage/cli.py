"""The command line: a thin click layer over build.py. The only place that knows exit codes:
0 ok, 1 build failure, 2 bad input (inventory, arguments, missing tools), 130 interrupted."""

from __future__ import annotations

import functools
import re
import signal
import sys
from pathlib import Path

import click

from . import __version__
from . import log as logmod
from .errors import InventoryError, PiimageError, UserError
from .log import log

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


def _sigterm(signum, frame):  # noqa: ARG001
    # SIGTERM (docker stop, CI cancel) takes the same path as Ctrl-C, so cleanup runs.
    raise KeyboardInterrupt


def _report(e: PiimageError) -> None:
    """The error as the terminal shows it: what a file said is quoted in messages, so a
    control character in a name or value is written as an escape, never raw."""
    out = _printable
    if isinstance(e, InventoryError):
        for p in e.problems:
            click.echo(out(p), err=True)
        click.echo(f"piimage: {out(e.message)}; nothing was built", err=True)
    else:
        click.echo(f"piimage: error: {out(e.message)}", err=True)
    if e.detail:
        for line in e.detail.splitlines():
            click.echo(f"    {out(line)}", err=True)
    if e.hint:
        click.echo(f"hint: {out(e.hint)}", err=True)


def handle_errors(fn):
    """Run a command body; turn our exceptions into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, **kwargs)
        except PiimageError as e:
            _report(e)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\npiimage: interrupted; cleaned up, nothing was published", err=True)
            sys.exit(EXIT_INTERRUPT)
        except (SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # a bug of ours: one line, the traceback only with -vv
            log.debug("internal error", exc_info=True)
            click.echo(
                f"piimage: internal error: {type(e).__name__}: {_printable(str(e))[:300]}\n"
                "  please report it with the output of the same command run with -vv",
                err=True,
            )
            sys.exit(1)

    return wrapper


# Secrets a user may have put in the wrong key, which a message quoting the value would echo:
# crypt(3) password hashes, private keys (PEM or OpenSSH's, whole or just their body).
_SECRET_SHAPES = (
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.S,
        ),
        "<a private key, not shown>",
    ),
    (re.compile(r"b3BlbnNzaC1rZXktdjE[A-Za-z0-9+/=]*"), "<a private key, not shown>"),
    (
        re.compile(r"\$(?:1|2[abxy]?|5|6|y|gy|7|sha1|md5)\$[./A-Za-z0-9$=+-]{8,}"),
        "<a password hash, not shown>",
    ),
)
LINE_MAX = 400  # a longer line of a message (a quoted value of thousands of items) is cut


def _printable(text: str) -> str:
    """A message as the terminal may show it: secrets replaced by what they are, over-long
    lines cut, control characters written as escapes."""
    for shape, said in _SECRET_SHAPES:
        text = shape.sub(said, text)
    text = "\n".join(
        ln if len(ln) <= LINE_MAX else f"{ln[:300]}… ({len(ln) - 300} characters more)"
        for ln in text.split("\n")
    )
    return "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)


def common_options(fn):
    fn = click.option(
        "-v", "--verbose", count=True, help="More detail on stderr (-vv for commands' output)."
    )(fn)
    fn = click.option(
        "-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars."
    )(fn)
    return fn


def _setup_logging(verbose: int, quiet: bool) -> None:
    logmod.setup(-1 if quiet else verbose)


def _load_cluster(inventory: Path | None):
    """The inventory, validated against the roles that have a node profile (ours, and a
    node-profiles/ folder beside cluster.yaml)."""
    from . import inventory as inv

    return inv.load(inventory)


inventory_option = click.option(
    "-i",
    "--inventory",
    type=click.Path(path_type=Path, dir_okay=False),
    help="cluster.yaml to use (default: ./cluster.yaml, else the built-in example cluster).",
)


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of node names (--nodes, --join); None when not given."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def ssh_options(fn):
    """--identity and --user: how verify and apply log in to the nodes."""
    fn = click.option(
        "--user", default="", help="Log in as this user (default: the inventory's admin)."
    )(fn)
    return click.option(
        "--identity",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Private key to log in as the admin with (default: ssh's own: agent, ~/.ssh/id_*).",
    )(fn)


def out_option(help: str):
    """--out, the folder whose <cluster>/ holds the images (build writes there, rehearse reads)."""
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=Path("out"),
        show_default=True,
        help=help,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="piimage")
def main() -> None:
    """Build ready-to-flash Raspberry Pi OS images for a SLURM + MPI cluster, one per node."""


@main.command()
@inventory_option
@click.option("--role", help="Role of the node to build (checked against the inventory).")
@click.option("--hostname", help="Hostname of the node to build (must be in the inventory).")
@click.option(
    "--all",
    "all_nodes",
    is_flag=True,
    help="Build every node of the inventory (with --role: every node of that role).",
)
@out_option("Output directory; images go to OUT/<cluster>/.")
@click.option(
    "--base",
    help="Base image: raspios-lite-arm64[-legacy], an https://….img.xz URL, or a local .img/.img.xz (overrides the inventory).",
)
@click.option(
    "--compress",
    type=click.Choice(["xz", "zstd", "gzip", "none"]),
    default=None,
    help="Also write a compressed copy (every core). Default: xz with --all, none otherwise; the raw .img is always kept.",
)
@click.option(
    "--url-base",
    help="Base URL for the images in os_list.json (Raspberry Pi Imager repository); default: file:// of the output folder.",
)
@click.option(
    "--update-base",
    is_flag=True,
    help="Take the newest base image for cluster.yaml's base: instead of the one piimage.lock holds, and lock that.",
)
@click.option("--keep-workspace", is_flag=True, help="Keep the temporary workspace for debugging.")
@common_options
@handle_errors
def build(
    inventory,
    role,
    hostname,
    all_nodes,
    out_dir,
    base,
    compress,
    url_base,
    update_base,
    keep_workspace,
    verbose,
    quiet,
):
    """Build flashable image(s): `--role compute --hostname node02`, or `--all`."""
    _setup_logging(verbose, quiet)
    from . import build as buildmod
    from . import inventory as inv

    cluster = _load_cluster(inventory)
    nodes = inv.select_nodes(cluster, hostname=hostname, role=role, all_nodes=all_nodes)
    if compress is None:
        compress = "xz" if all_nodes else "none"
    keys = buildmod.preflight(cluster, compress=compress)
    bp = buildmod.plan(
        cluster,
        nodes,
        keys=keys,
        out_dir=out_dir,
        base=base,
        keep_workspace=keep_workspace,
        compress=compress,
        url_base=url_base,
        update_base=update_base,
    )
    for path in buildmod.execute(bp):
        click.echo(str(path))


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
    help="Where to write cluster.yaml and .piimage/secrets/.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing cluster.yaml.")
@common_options
@handle_errors
def init(directory, force, verbose, quiet):
    """Write an editable cluster.yaml and a private secrets directory."""
    _setup_logging(verbose, quiet)
    from . import inventory as inv

    for path in inv.init(directory, force=force):
        click.echo(str(path))
    log.info("edit cluster.yaml, then: piimage build --all")


@main.command()
@inventory_option
@common_options
@handle_errors
def check(inventory, verbose, quiet):
    """Validate the inventory and list its nodes (nothing is downloaded or written)."""
    _setup_logging(verbose, quiet)
    from . import build
    from .settings import data_dir
    from .stages import discover

    cluster = _load_cluster(inventory)
    # the stages a build would use, yours included: a broken stage.yaml fails here, not later
    stages = discover([data_dir() / "stages", *cluster.stages])
    # ... and every node's files rendered as a build renders them (templates, `when:`, paths),
    # with stand-in keys: nothing is generated, read from the secrets directory or written
    build.plan(cluster, cluster.nodes, keys=build.stand_in_keys(cluster), out_dir=Path("out"))
    click.echo(f"cluster {cluster.name}: {len(cluster.nodes)} nodes, base {cluster.base}")
    for n in cluster.nodes:
        click.echo(f"  {n.hostname:<16} {n.role:<10} {n.ip}")
    click.echo(f"stages: {', '.join(st.name for st in stages)}")


@main.command()
@inventory_option
@out_option(
    "Where the built images are (OUT/<cluster>/<node>.img); logs go to OUT/<cluster>/rehearsal/."
)
@click.option(
    "--nodes", help="Comma-separated nodes to boot (default: every node); must include the head."
)
@click.option(
    "--timeout",
    type=click.IntRange(min=60),
    default=1200,
    show_default=True,
    help="Seconds to wait for the cluster to boot and become ready.",
)
@click.option(
    "--hold",
    is_flag=True,
    help="After the checks keep the cluster running, reachable from a network namespace on "
    "its network (ip netns exec …: the log names it), until Ctrl-C.",
)
@click.option(
    "--join",
    "join",
    metavar="NODES",
    help="Boot these nodes (comma-separated, built from the current cluster.yaml) into the "
    "rehearsal already held (--hold) with the same --out, as new cards powered on beside "
    "the running ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@common_options
@handle_errors
def rehearse(inventory, out_dir, nodes, timeout, hold, join, as_json, verbose, quiet):
    """Boot the built images as a virtual cluster under QEMU and run real jobs on it."""
    _setup_logging(verbose, quiet)
    import json

    from . import inventory as inv
    from . import rehearse as rh

    cluster = _load_cluster(inventory)
    if join:
        wanted = _names(join) or []
        inv.select_nodes(cluster, names=wanted, all_nodes=False)  # known nodes, or exit 2
        source = cluster.source or Path("cluster.yaml")
        answer = rh.join(cluster, wanted, out_dir=out_dir, inventory=source, timeout=timeout)
        if answer.get("error"):
            raise UserError(answer["error"])
        for a in answer["nodes"].values():
            click.echo(f"{'up  ' if a['ok'] else 'FAIL'}  {a['summary']}")
        if not all(a["ok"] for a in answer["nodes"].values()):
            raise rh.RehearsalFailed("a joining node did not come up")
        return
    names = _names(nodes)
    selected = inv.select_nodes(cluster, names=names, all_nodes=names is None)
    report = rh.rehearse(cluster, selected, out_dir=out_dir, timeout=timeout, hold=hold)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.text())
    if not report.ok:
        failed = (
            ", ".join(f"{c.node} {c.name}" for c in report.checks if not c.ok)
            or "the cluster never came up"
        )
        raise rh.RehearsalFailed(f"rehearsal failed: {failed}")


@main.command()
@inventory_option
@out_option(
    "Where the built images are (to date the head's clock against); the report goes to OUT/<cluster>/verify/."
)
@click.option(
    "--nodes", help="Comma-separated nodes to check (default: every node); must include the head."
)
@ssh_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@common_options
@handle_errors
def verify(inventory, out_dir, nodes, identity, user, as_json, verbose, quiet):
    """Run the rehearsal's checks against the real boards, over SSH as the admin."""
    _setup_logging(verbose, quiet)
    import json

    from . import inventory as inv
    from . import verify as vf

    cluster = _load_cluster(inventory)
    names = _names(nodes)
    selected = inv.select_nodes(cluster, names=names, all_nodes=names is None)
    report = vf.verify(cluster, selected, out_dir=out_dir, identity=identity, user=user)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.text())
    if not report.ok:
        raise vf.VerifyFailed(vf.describe_failure(report))


@main.command(name="apply")
@inventory_option
@click.option("--nodes", help="Comma-separated nodes to bring up to date (default: every node).")
@click.option("--dry-run", is_flag=True, help="Only show what would change; change nothing.")
@ssh_options
@common_options
@handle_errors
def apply_cmd(inventory, nodes, dry_run, identity, user, verbose, quiet):
    """Bring the running cluster's cluster-wide files (slurm.conf, hosts, known hosts, MPI
    hostfiles, exports, time settings) up to date with cluster.yaml, over SSH."""
    _setup_logging(verbose, quiet)
    from . import apply as ap
    from . import inventory as inv

    cluster = _load_cluster(inventory)
    names = _names(nodes)
    selected = inv.select_nodes(cluster, names=names, all_nodes=names is None)
    outcome = ap.apply(
        cluster, selected, dry_run=dry_run, identity=identity, user=user, echo=click.echo
    )
    click.echo(outcome.text())
    if not outcome.ok:
        failed = ", ".join(n for n, r in outcome.results.items() if r.error)
        raise ap.ApplyFailed(f"apply failed on {failed}")
    if not outcome.changes and not outcome.removed:
        click.echo("the cluster is up to date")
    elif dry_run:
        click.echo(f"{outcome.changes} file(s) would change (--dry-run: nothing was written)")


@main.command()
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-i",
    "--inventory",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also say how each card differs from what a build from this cluster.yaml would write.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@common_options
@handle_errors
def inspect(targets, inventory, as_json, verbose, quiet):
    """Say which node each IMAGE, compressed image or flashed card (a block device) is: its
    cluster, role, base, build and key package versions. Read-only."""
    _setup_logging(verbose, quiet)
    import json

    from . import build, identify

    planned = None
    if inventory is not None:
        cluster = _load_cluster(inventory)
        # two plans with different stand-in keys: a file that differs between them holds keys
        # (never read from the secrets directory here), and is not compared
        a, b = (
            build.plan(
                cluster, cluster.nodes, keys=build.stand_in_keys(cluster, v), out_dir=Path("out")
            )
            for v in (0, 1)
        )
        planned = {
            pa.hostname: identify.comparable(pa.stamp.files, pb.stamp.files)
            for pa, pb in zip(a.nodes, b.nodes)
        }
    found = identify.inspect(list(targets), planned)
    if as_json:
        click.echo(json.dumps([f.to_json() for f in found], indent=2))
        return
    for n, item in enumerate(found):
        if n:
            click.echo("")
        for line in identify.text_report(item):
            click.echo(_printable(line))


@main.command()
@click.argument("what", required=False)
@click.argument("device", required=False)
@inventory_option
@out_option("Where the built images are (OUT/<cluster>/<node>.img).")
@click.option(
    "--all", "all_nodes", is_flag=True, help="Every node of the inventory, one card after another."
)
@click.option("-y", "--yes", is_flag=True, help="Write without asking first.")
@click.option("--allow-fixed", is_flag=True, help="Also write a disk that is not removable.")
@click.option("--allow-large", is_flag=True, help="Also write a disk larger than 256 GiB.")
@common_options
@handle_errors
def flash(
    what, device, inventory, out_dir, all_nodes, yes, allow_fixed, allow_large, verbose, quiet
):
    """Write a node's image to an SD card and read it back: WHAT is a node of the inventory
    (its OUT/<cluster>/<node>.img) or an image file, DEVICE the card's whole disk (/dev/sdX,
    /dev/mmcblkN). Only the blocks the image's .bmap maps are written. --all: every node in
    turn, each onto the next card put in."""
    _setup_logging(verbose, quiet)
    import time

    from . import flash as fl
    from .errors import UserError

    opts = {"yes": yes, "allow_fixed": allow_fixed, "allow_large": allow_large}
    if all_nodes:
        if what or device:
            raise UserError("--all takes no node or device: it asks for each card in turn")
        cluster = _load_cluster(inventory)
        images = [(n.hostname, out_dir / cluster.name / f"{n.hostname}.img") for n in cluster.nodes]
        missing = [str(p) for _, p in images if not p.is_file()]
        if missing:
            raise UserError(
                f"not built: {', '.join(missing)}", hint="piimage build --all --compress none"
            )
        for n, (host, image) in enumerate(images, 1):
            before = fl.card_paths(fl.lsblk())
            click.echo(f"[{n}/{len(images)}] put in the card for {host} (Ctrl-C stops) …", err=True)
            card = fl.wait_for_card(before, fl.lsblk, sleep=time.sleep)
            fl.settle()
            _flash_one(fl, image, card.path, **opts)
            click.echo(f"take the card for {host} out", err=True)
            fl.wait_for_removal(card.path, fl.lsblk, sleep=time.sleep)
        click.echo(f"all {len(images)} cards written and checked")
        return
    if not what or not device:
        raise UserError(
            "give a node (or an image) and the card's device: piimage flash node02 /dev/sdX"
        )
    image = Path(what)
    if not image.exists() and "/" not in what and not what.endswith(".img"):
        cluster = _load_cluster(inventory)
        if what not in {n.hostname for n in cluster.nodes}:
            raise UserError(f"{what}: neither an image file nor a node of cluster {cluster.name}")
        image = out_dir / cluster.name / f"{what}.img"
    _flash_one(fl, image, device, **opts)


def _flash_one(fl, image: Path, device: str, *, yes: bool, allow_fixed: bool, allow_large: bool):
    import os

    from .errors import UserError
    from .log import human_size

    if image.suffix in (".xz", ".zst", ".gz"):
        raise UserError(
            f"{image}: is compressed; flash writes the raw image with its .bmap "
            f"({image.with_suffix('')})"
        )
    if not image.is_file():
        raise UserError(f"{image}: no such image", hint="build it first: piimage build")
    size = image.stat().st_size
    bmap_path = image.with_name(image.name + ".bmap")
    if bmap_path.is_file():
        bmap = fl.read_bmap(bmap_path)
        if bmap.image_size != size:
            raise UserError(f"{bmap_path}: maps {bmap.image_size} bytes, {image} has {size}")
    else:
        log.warning("%s has no .bmap: writing all of it", image)
        blocks = -(-size // 4096)
        bmap = fl.BlockMap(4096, size, ((0, blocks - 1, None),), "")
    if os.geteuid() != 0:
        raise UserError("writing a card needs root", hint="sudo piimage flash …")
    dev, automounted = fl.check_target(
        device, size, fl.lsblk(), allow_large=allow_large, allow_fixed=allow_fixed
    )
    click.echo(_printable(dev.describe()), err=True)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask on: add --yes to write without asking")
        if not click.confirm(
            f"Write {image.name} ({human_size(bmap.mapped_bytes)} of data) to {dev.path}? "
            "Everything on it is lost",
            default=False,
            err=True,
        ):
            click.echo("nothing was written", err=True)
            sys.exit(1)
    fl.unmount(automounted)
    try:
        figures = fl.write_and_verify(image, bmap, dev.path)
    except KeyboardInterrupt:
        click.echo(
            f"\npiimage: interrupted: {dev.path} is not a good card (its partition table was "
            "cleared so it cannot boot half-written); flash it again",
            err=True,
        )
        sys.exit(EXIT_INTERRUPT)
    except PiimageError:
        log.error("%s is not a good card (its partition table was cleared)", dev.path)
        raise
    fl.settle()
    click.echo(
        f"done: {image.name} on {dev.path}: {human_size(figures['bytes'])} written in "
        f"{figures['write_s']:.1f} s, read back and checked in {figures['verify_s']:.1f} s"
    )


@main.command()
@click.option("--prune", is_flag=True, help="Remove role layers and base images (see below).")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="DAYS",
    help="With --prune: remove what no build has used for DAYS days (default 30, unless --max-size).",
)
@click.option(
    "--max-size",
    metavar="SIZE",
    help="With --prune: then remove the least recently used until the caches fit SIZE (20G, 500M).",
)
@click.option("--dry-run", is_flag=True, help="With --prune: say what would go, remove nothing.")
@common_options
@handle_errors
def cache(prune, older_than, max_size, dry_run, verbose, quiet):
    """List the caches (role layers, base images, rehearsal kernels, apt's packages) with size
    and last use; --prune removes old role layers and base images, never one a build is using."""
    _setup_logging(verbose, quiet)
    import time

    from . import cache as c
    from .errors import UserError
    from .log import human_size

    if (older_than is not None or max_size or dry_run) and not prune:
        raise UserError("--older-than, --max-size and --dry-run go with --prune")
    limit = None
    if max_size:
        try:
            limit = c.parse_size(max_size)
        except ValueError:
            raise UserError(
                f"--max-size: {max_size!r} is not a size", hint="a number with K, M, G or T: 20G"
            ) from None
    found = c.entries()
    now = time.time()
    if not prune:
        for e in found:
            click.echo(
                f"{e.kind:<17} {e.name:<28} {human_size(e.size):>10}  used {c.age(now - e.used)}"
            )
        click.echo(f"{'in all':<46} {human_size(sum(e.size for e in found)):>10}")
        return
    if older_than is None and limit is None:
        older_than = 30
    chosen = c.to_prune(found, older_than_days=older_than, max_bytes=limit, now=now)
    removed = c.prune(chosen, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} {e.kind} {e.name} ({human_size(e.size)}, used {c.age(now - e.used)})")
    freed = sum(e.size for e in removed)
    left = sum(e.size for e in found) - freed
    click.echo(
        f"{verb} {len(removed)} entries, {human_size(freed)}; the caches hold {human_size(left)}"
    )
    if limit is not None and left > limit:
        log.warning(
            "the caches are still over %s: what is left is in use or is not pruned "
            "(rehearsal kernels, apt's packages: remove those folders by hand)",
            human_size(limit),
        )


if __name__ == "__main__":
    main()
