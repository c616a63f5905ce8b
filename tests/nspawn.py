"""A real systemd for tests: a Debian bookworm tree booted with systemd-nspawn.

The tree is built once with debootstrap and cached outside the repository, under
`/var/cache/sensor-hub-tests/`, keyed by the package list (first time: about a minute and
250 MB; after that it is reused). It is built into a temporary directory beside its final place and
renamed, so a build that is killed leaves no half tree, and under a file lock, so two runs do
not build it twice. Each test run mounts an overlay on it (the cached tree stays as it was),
installs the hub there as docs/deploy.md says, and boots it:

    systemd-nspawn -D ROOT --boot --register=no --keep-unit --console=passive

The container shares the host's network (no `--private-network`): the hub inside reaches the
host's InfluxDB on 127.0.0.1, and devices on the host reach the hub. Commands run inside with
`nsenter -t <the container's PID 1> -a`. The machine is stopped by its process id.

The tree has no `procps` on purpose: the hub's unit must not need `/bin/kill` from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.packages import InstallError, install_missing

CACHE_DIR = Path(os.environ.get("SENSOR_HUB_TEST_CACHE", "/var/cache/sensor-hub-tests"))
SUITE = "bookworm"
# What docs/deploy.md needs (python3-venv brings pip for the venv), systemd as PID 1, and
# nothing more: no procps.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "passwd")
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT_S = 900.0
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 120.0


class MachineError(RuntimeError):
    """The test machine could not be built, booted or used."""


def tree_key(packages: Sequence[str] = PACKAGES) -> str:
    """The cache key of a tree: the suite and the sorted package list."""
    digest = hashlib.sha256(" ".join([SUITE, *sorted(packages)]).encode()).hexdigest()
    return f"{SUITE}-{digest[:12]}"


def debian_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror this machine's apt already uses for bookworm, or deb.debian.org."""
    if sources is None:
        sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            # deb822 (.sources): URIs and Suites in one stanza.
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split():
                    return uris.group(1).rstrip("/")
            # one-line format: deb URI SUITE COMPONENTS
            for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
                if match.group(2) == SUITE:
                    return match.group(1).rstrip("/")
    return DEFAULT_MIRROR


def ensure_host_tools() -> None:
    """Install debootstrap and systemd-nspawn with apt-get if missing, or fail saying so."""
    try:
        install_missing(HOST_TOOLS)
    except InstallError as exc:
        raise MachineError(str(exc)) from None


def cached_tree(packages: Sequence[str] = PACKAGES) -> Path:
    """The cached bookworm tree with `packages`, built now if it is not there yet."""
    final = CACHE_DIR / tree_key(packages)
    if (final / "usr/lib/systemd/systemd").exists():
        return final
    ensure_host_tools()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it: wait for it
        if (final / "usr/lib/systemd/systemd").exists():
            return final
        building = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=CACHE_DIR))
        try:
            result = subprocess.run(
                [
                    "debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                    SUITE, str(building), debian_mirror(),
                ],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise MachineError(
                    f"debootstrap exited {result.returncode}:\n{result.stdout[-3000:]}"
                    f"\n{result.stderr[-2000:]}"
                )
            # A machine-id makes the journal persistent-capable and quiets first-boot setup.
            machine_id = hashlib.sha256(final.name.encode()).hexdigest()[:32]
            (building / "etc/machine-id").write_text(machine_id + "\n")
            shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
            building.chmod(0o755)  # mkdtemp made it 0700; it is the container's /
            building.rename(final)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return final


@contextlib.contextmanager
def overlay(lower: Path, scratch: Path) -> Iterator[Path]:
    """`lower` seen through a writable overlay in `scratch`: the cached tree stays untouched."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "root"
    for directory in (upper, work, merged):
        directory.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mount.returncode != 0:
        raise MachineError(f"cannot mount an overlay on {lower}: {mount.stderr}")
    try:
        yield merged
    finally:
        if subprocess.run(["umount", str(merged)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)
        # The installed hub (~100 MB, root's files) is of no use after the run.
        shutil.rmtree(upper, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def chroot(root: Path, *argv: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command in `root` with chroot (before boot); its output, or MachineError."""
    result = subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise MachineError(
            f"chroot {' '.join(argv)}: exit {result.returncode}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


class Machine:
    """A booted container: its PID 1 on the host, commands run inside with nsenter."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self) -> None:
        """Boot the tree and wait (bounded) until systemd inside answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn", "-D", str(self.root), "--boot", "--register=no",
                    "--keep-unit", "--console=passive", "--quiet",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        # The container's /run is its own tmpfs: look at it through its PID 1's root.
        while not (self.leader and Path(f"/proc/{self.leader}/root/run/systemd/private").exists()):
            if self.process.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited {self.process.returncode}:\n"
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise MachineError("the container did not boot in time")
            self.leader = self.leader or _child_of(self.process.pid)
            time.sleep(0.1)
        # systemctl works once the manager listens; wait until boot has settled enough.
        self.run("systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT_S)

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces) and capture its output."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *argv],
            capture_output=True, text=True, timeout=timeout, check=False, input=input_text,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""},
        )  # fmt: skip
        if check and result.returncode != 0:
            raise MachineError(
                f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def stop(self) -> None:
        """Power the container off (SIGRTMIN+4 to its init, as machinectl does), then kill it
        by its pid if it does not go within the timeout."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.leader:
                os.kill(self.leader, signal.SIGRTMIN + 4)
            else:
                os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)


def _child_of(pid: int) -> int:
    """The container's init: the descendant of `pid` (systemd-nspawn) that runs systemd,
    or 0 before it exists."""
    with contextlib.suppress(OSError, ValueError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
            if found := _child_of(int(child)):
                return found
    return 0


# --- The hub installed as docs/deploy.md says ---------------------------------------------------

VENV = "/opt/sensor-hub/.venv"
HUB = f"{VENV}/bin/hub"
CONFIG = "/etc/sensor-hub/hub.toml"
SERVICE_USER = "sensor-hub"


def build_wheels(project: Path, out: Path) -> Path:
    """The hub and its dependencies as wheels, built on the host (`pip wheel`) from a copy of
    the project's tracked files: setuptools' `build/` in the work tree keeps modules that were
    moved or deleted since, and would put them in the wheel."""
    source = out / "source"
    listed = (
        subprocess.run(
            ["git", "-C", str(project), "ls-files", "-z"], capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (project / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise MachineError(f"pip wheel exited {result.returncode}:\n{result.stderr[-3000:]}")
    shutil.rmtree(source)
    return out


def install_hub(root: Path, wheels: Path, units: Path, hub_toml: str) -> None:
    """Steps 1, 3 and 4 of docs/deploy.md in the (not yet booted) tree at `root`: the user,
    the virtualenv from `wheels` (no index), the settings, an empty token file, the units
    from `units` (hub.service, hub.socket). Nothing is started."""
    chroot(root, "useradd", "--system", "--home-dir", "/var/lib/sensor-hub",
           "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER)  # fmt: skip
    shutil.copytree(wheels, root / "var/tmp/wheels")
    chroot(root, "python3", "-m", "venv", VENV)
    chroot(root, f"{VENV}/bin/pip", "install", "-q", "--no-index",
           "--find-links", "/var/tmp/wheels", "sensor-hub")  # fmt: skip
    etc = root / "etc/sensor-hub"
    etc.mkdir(mode=0o755)
    (etc / "hub.toml").write_text(hub_toml)
    chroot(root, "chown", f"root:{SERVICE_USER}", CONFIG)
    (etc / "hub.toml").chmod(0o640)
    (etc / "influx_token").touch(mode=0o600)
    for unit in ("hub.service", "hub.socket"):
        shutil.copy(units / unit, root / "etc/systemd/system" / unit)


def drop_in(root: Path, unit: str, text: str, name: str = "test.conf") -> None:
    """A drop-in for `unit` in /etc/systemd/system (`systemctl daemon-reload` to apply it)."""
    directory = root / "etc/systemd/system" / f"{unit}.d"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
