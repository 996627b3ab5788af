"""Object-storage servers for tests: an S3 server (moto) and a GCS emulator, both on 127.0.0.1, and a network guard.

Register the module as a plugin of the test file (importing fixtures by name makes ruff flag F811):

    pytest_plugins = ["storage_fixtures"]  # then ask for storage_env, s3_bucket, gcs_bucket, no_remote_network

`storage_env` (session) starts both servers once, points every credential and metadata lookup of boto and the
Google libraries at dummies or at nothing, and sets fsspec's configuration so that plain `s3://` and `gs://`
URLs reach the local servers, in this process and in every subprocess started with `storage_env.env` (or
`subprocess_env()`). `s3_bucket` / `gcs_bucket` give a fresh empty bucket URL per test (`s3://t-1a2b3c4d`), with
the network guard on. `no_remote_network` fails the test when anything connects to, or looks up, a name or
address other than the loopback ones.

`scripted_s3` points s3:// at a tiny endpoint whose answers a test scripts (an S3 error code, a bare HEAD
status, or accepting and never answering); `silent_server()` is a 127.0.0.1 endpoint that never answers (for
gs:// through STORAGE_EMULATOR_HOST).

What the guard cannot see: connections made by C libraries (gRPC: gcsfs's storage-control calls, which the
environment here turns off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false), name lookups by a C resolver (aiodns,
not installed here), and subprocesses started without `storage_env.env` or with `python -I`/`-S` (no
sitecustomize). Variables that would send a lookup elsewhere (a profile, a container's or web identity's
credential endpoint, a proxy: UNSET) are removed from this process and from `storage_env.env`.

What a subprocess needs to reach the servers is only environment variables (see `StorageEnv.variables`): fsspec
reads `FSSPEC_<PROTOCOL>_<OPTION>` into its configuration when it is imported, gcsfs reads STORAGE_EMULATOR_HOST.
`storage_env.env` also puts a sitecustomize module on the subprocess's PYTHONPATH that refuses non-loopback
connections there and records them for `no_remote_network`.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

# Names looked up without the network (the hosts file); this machine's own name too (libraries ask for it).
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname().lower()}


# Put on a subprocess's PYTHONPATH by storage_env: the same guard in every Python child (a multi-host run's
# processes). A refused connection or lookup is appended to the file VITNT_TEST_NETWORK_LOG names, which
# no_remote_network reads when its test ends.
_SITECUSTOMIZE = """
import ipaddress, os, socket

_log = os.environ.get("VITNT_TEST_NETWORK_LOG")
_names = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname().lower()}


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in _names:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(what):
    if _log:
        with open(_log, "a") as f:
            f.write(f"pid {os.getpid()}: {what}\\n")
    raise OSError(f"test subprocess reached for a non-loopback address: {what}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        _refuse(f"connect {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


@dataclass
class StorageEnv:
    """The running servers: endpoints, and the environment variables that reach them."""

    s3_endpoint: str  # http://127.0.0.1:PORT
    gcs_endpoint: str  # http://127.0.0.1:PORT
    variables: dict[str, str] = field(default_factory=dict)  # what this fixture set (and a subprocess needs)
    network_log: str = ""  # where guarded subprocesses record a refused connection

    def subprocess_attempts(self) -> list[str]:
        """Returns what guarded subprocesses tried beyond the loopback interface, and forgets it."""
        try:
            with open(self.network_log) as f:
                lines = f.read().splitlines()
            os.unlink(self.network_log)
        except FileNotFoundError:
            return []
        return lines

    @property
    def env(self) -> dict[str, str]:
        """The whole environment for a subprocess (`subprocess.run(..., env=storage_env.env)`).

        Less the variables that would send a credential lookup or a request elsewhere (UNSET).
        """
        return {**{k: v for k, v in os.environ.items() if k not in UNSET}, **self.variables}


# Variables of the outer environment that would make boto or the Google libraries look elsewhere: a profile,
# a container's or a web identity's credential endpoint (an STS call), a proxy, boto's own configuration. Removed
# from this process while storage_env lasts and from every environment `storage_env.env` gives a subprocess.
UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CA_BUNDLE",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "BOTO_CONFIG",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE",
    "FSSPEC_CONFIG_DIR",
)


def _closed_port() -> int:
    """Returns a 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_endpoint() -> str:
    """Returns an http://127.0.0.1 URL on a port nothing listens on (an unreachable endpoint, refused at once)."""
    return f"http://127.0.0.1:{_closed_port()}"


def storage_variables(s3_endpoint: str, gcs_endpoint: str, folder: str) -> dict[str, str]:
    """Returns the environment that sends s3:// and gs:// to these endpoints with dummy credentials and no probes.

    `folder` holds the empty AWS config files (and stands for gcloud's configuration folder).
    """
    empty = os.path.join(folder, "empty")
    return {
        # boto: dummy keys, no profile files, no instance-metadata (169.254.169.254) lookup.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": empty,
        "AWS_SHARED_CREDENTIALS_FILE": empty,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint,
        "FSSPEC_S3_KEY": "testing",
        "FSSPEC_S3_SECRET": "testing",
        # Google: the emulator, anonymous access, no metadata server (GCE_METADATA_HOST is loopback), no gcloud
        # credentials, and gcsfs's bucket-type lookup off (it would call the storage-control API over gRPC, a
        # connection no Python socket guard sees).
        "STORAGE_EMULATOR_HOST": gcs_endpoint,
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_PROJECT": "test-project",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "GCE_METADATA_HOST": "127.0.0.1",
        "GCE_METADATA_IP": "127.0.0.1",
        "GCE_METADATA_ROOT": "127.0.0.1",
        "NO_GCE_CHECK": "true",
        "GOOGLE_APPLICATION_CREDENTIALS": os.path.join(folder, "no-credentials.json"),
        "CLOUDSDK_CONFIG": folder,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # Proxies would send loopback traffic elsewhere.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def _set_fsspec_config(variables: dict[str, str]) -> None:
    """Puts the FSSPEC_* variables into fsspec's configuration of this process (read once, at its import)."""
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf, {k: v for k, v in variables.items() if k.startswith("FSSPEC_")})
    clear_instance_caches()


def clear_instance_caches() -> None:
    """Forgets every cached fsspec file-system instance (and so its listings and its connections' settings)."""
    import fsspec.spec

    for cls in _subclasses(fsspec.spec.AbstractFileSystem):
        with contextlib.suppress(Exception):
            cls.clear_instance_cache()


def _subclasses(cls):
    seen, todo = [], [cls]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return seen


@pytest.fixture(scope="session")
def storage_env():
    """Starts the S3 and GCS servers on 127.0.0.1 for the session, with the environment that reaches them."""
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer

    for name in ("werkzeug", "gcp_storage_emulator", "gcsfs", "s3fs", "botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # request lines and retry tracebacks
    with tempfile.TemporaryDirectory(prefix="storage-env-") as folder, pytest.MonkeyPatch.context() as patch:
        with open(os.path.join(folder, "empty"), "w"):
            pass
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        gcs = create_server("127.0.0.1", 0, in_memory=True)
        gcs.start()
        gcs._api._httpd.handle_error = lambda request, address: None  # a client that hangs up early: no traceback
        try:
            host, port = s3.get_host_and_port()
            gcs_port = gcs._api._httpd.server_address[1]
            env = StorageEnv(f"http://{host}:{port}", f"http://127.0.0.1:{gcs_port}")
            env.variables = storage_variables(env.s3_endpoint, env.gcs_endpoint, folder)
            site = os.path.join(folder, "site")
            os.mkdir(site)
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(_SITECUSTOMIZE)
            env.network_log = os.path.join(folder, "network.log")
            env.variables["VITNT_TEST_NETWORK_LOG"] = env.network_log
            # Only for subprocesses (env.env): this process has the fixture's own guard.
            subprocess_path = os.pathsep.join(x for x in (site, os.environ.get("PYTHONPATH", "")) if x)
            for key in UNSET:
                patch.delenv(key, raising=False)
            for key, value in env.variables.items():
                patch.setenv(key, value)
            env.variables["PYTHONPATH"] = subprocess_path
            import fsspec.config

            patch.setattr(fsspec.config, "conf", {k: dict(v) for k, v in fsspec.config.conf.items()})
            _set_fsspec_config(env.variables)
            yield env
        finally:
            clear_instance_caches()
            s3.stop()
            gcs.stop()


def subprocess_env(env: StorageEnv) -> dict[str, str]:
    """Returns the environment a subprocess (`python -m vitnt_jax.score ...`) needs to reach the servers."""
    return env.env


def _loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteNetworkUsed(OSError):
    """Raised (and recorded) when code under test reaches for a non-loopback address."""


@contextlib.contextmanager
def network_guard():
    """Refuses, and lists, every connection or name lookup that leaves the loopback interface while active.

    Yields the list of what was attempted. Unix sockets and loopback addresses are allowed. Patched: socket
    connect/connect_ex (asyncio and aiohttp connect through these), socket.create_connection and getaddrinfo.
    Connections made by C libraries (gRPC) bypass Python's socket module and are not seen.
    """
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo, real_create = socket.getaddrinfo, socket.create_connection

    def check(what, address):
        if isinstance(address, tuple) and address and not _loopback(address[0]):
            attempts.append(f"{what} {address!r}")
            raise RemoteNetworkUsed(f"test reached for a non-loopback address {address!r}")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check("connect", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check("connect", address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host):
            attempts.append(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test looked up a non-loopback name {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        check("create_connection", address)
        return real_create(address, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        patch.setattr(socket, "create_connection", create_connection)
        yield attempts


@pytest.fixture
def no_remote_network(request):
    """Fails the test when anything in it connects to (or looks up) a non-loopback address; see network_guard.

    With storage_env, subprocesses started with `storage_env.env` are guarded too (a sitecustomize module on
    their PYTHONPATH), and what they tried fails the test as well.
    """
    env = request.getfixturevalue("storage_env") if "storage_env" in request.fixturenames else None
    if env is not None:
        env.subprocess_attempts()  # an earlier test's, already reported
    with network_guard() as attempts:
        yield attempts
    if env is not None:
        attempts.extend(env.subprocess_attempts())
    if attempts:
        pytest.fail(f"the test reached for the network beyond 127.0.0.1: {attempts[:5]}")


def _bucket(fs, scheme: str) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return f"{scheme}://{name}"


@pytest.fixture
def s3_bucket(storage_env, no_remote_network):
    """A fresh, empty bucket on the S3 server: its URL, `s3://t-...` (no slash at the end)."""
    import fsspec

    clear_instance_caches()
    yield _bucket(fsspec.filesystem("s3", use_listings_cache=False), "s3")
    clear_instance_caches()


@pytest.fixture
def gcs_bucket(storage_env, no_remote_network):
    """A fresh, empty bucket on the GCS emulator: its URL, `gs://t-...` (no slash at the end)."""
    import fsspec

    clear_instance_caches()
    yield _bucket(fsspec.filesystem("gcs", use_listings_cache=False), "gs")
    clear_instance_caches()


@pytest.fixture
def unreachable_s3(storage_env, no_remote_network, monkeypatch):
    """Points s3:// at a 127.0.0.1 port nothing listens on (for this test); yields that endpoint URL.

    For a subprocess, pass `{**storage_env.env, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}`.
    """
    import fsspec.config

    endpoint = closed_endpoint()
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": endpoint})
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    clear_instance_caches()
    yield endpoint
    clear_instance_caches()


@pytest.fixture
def no_s3_credentials(storage_env, no_remote_network, monkeypatch):
    """Removes every S3 credential (environment and fsspec configuration) for this test."""
    import fsspec.config

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    conf = {k: v for k, v in fsspec.config.conf.get("s3", {}).items() if k not in ("key", "secret", "token")}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    clear_instance_caches()
    yield
    clear_instance_caches()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Yields an http://127.0.0.1 URL whose server accepts every connection and never answers (a hung endpoint)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        server.close()
        for connection in held:
            connection.close()


@dataclass
class ScriptedS3:
    """A tiny S3 endpoint on 127.0.0.1 serving `objects` ({'bucket/key': bytes}) by HEAD and ranged GET.

    `fail(method, key, count)` may return None (answer normally), (status, code) for an S3 error answer (HEAD
    answers carry no body, as S3's do) or 'hang' (accept and never answer). `count` is the request's number,
    1 first. `requests` lists (method, key) of every request.
    """

    endpoint: str = ""
    objects: dict[str, bytes] = field(default_factory=dict)
    fail: Callable[[str, str, int], object] = lambda method, key, count: None
    requests: list[tuple[str, str]] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)


def _scripted_handler(state: ScriptedS3):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _answer(self, body: bool) -> None:
            key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
            state.requests.append((self.command, key))
            failure = state.fail(self.command, key, len(state.requests))
            if failure == "hang":
                state.released.wait(120)
                return
            if failure is not None:
                status, code = failure
                text = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>scripted {code}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(text) if body else 0))
                self.end_headers()
                if body:
                    self.wfile.write(text)
                return
            data = state.objects.get(key)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = 0, len(data) - 1
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes="):
                a, _, b = wanted[6:].partition("-")
                first, last = int(a), min(int(b) if b else last, last)
            part = data[first : last + 1]
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Length", str(len(part) if body else len(data)))
            self.send_header("ETag", '"e"')
            self.send_header("Last-Modified", "Wed, 02 Dec 2026 00:00:00 GMT")
            if wanted:
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(part)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@pytest.fixture
def scripted_s3(storage_env, no_remote_network, monkeypatch):
    """Points s3:// at a ScriptedS3 endpoint on 127.0.0.1 for this test; yields it."""
    import fsspec.config

    state = ScriptedS3()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _scripted_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": state.endpoint})
    monkeypatch.setenv("AWS_ENDPOINT_URL", state.endpoint)
    clear_instance_caches()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()
        clear_instance_caches()
