"""A network namespace joined to this one by a veth pair: a test host on this machine whose
network a test can cut (ip netns; needs root). Used by tests/vanished_node_run.py."""
import os
import shutil
import signal
import subprocess


def ip(*args: str, ns: str = "") -> None:
    """`ip ARGS`, inside namespace `ns` if given; what ip says on stderr goes into the error."""
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def make(name: str, host: str, node: str) -> None:
    """Namespace `name` with address `node`/30 on its end of the pair (name + "n"), and `host`/30
    on this side's (name + "h"); its default route leads here, to this machine's own addresses."""
    ip("netns", "add", name)
    ip("link", "add", name + "h", "type", "veth", "peer", "name", name + "n")
    ip("link", "set", name + "n", "netns", name)
    ip("addr", "add", f"{host}/30", "dev", name + "h")
    ip("link", "set", name + "h", "up")
    ip("addr", "add", f"{node}/30", "dev", name + "n", ns=name)
    ip("link", "set", name + "n", "up", ns=name)
    ip("link", "set", "lo", "up", ns=name)
    ip("route", "add", "default", "via", host, ns=name)


def cut(name: str) -> None:
    """The namespace's end of the pair set down: from now on nothing crosses, either way."""
    ip("link", "set", name + "n", "down", ns=name)


def remove(name: str) -> None:
    """Every process in the namespace, the namespace and the pair: whatever of them exists."""
    if shutil.which("ip") is None:       # then none was made: make() says why
        return
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)       # takes the pair with it
    subprocess.run(["ip", "link", "del", name + "h"], capture_output=True)  # a pair made half-way
