"""Shared pytest fixtures.

Sections:
  * markers
  * backend: one private real Dovecot for the whole session
  * proxy: (to be added)
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator

import imapclient
import pytest

from cpmproxy.testing.dovecot import Dovecot
from cpmproxy.testing.sample import ManifestEntry, seed_sample_store

# ---------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------

# Proxy fixtures (proxy, make_proxy, proxy_certs) live in tests/proxyfix.py.
pytest_plugins = ["tests.proxyfix"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    keep_bytecode_out_of_tree()


def keep_bytecode_out_of_tree() -> None:
    """The tests start hundreds of proxy and cpm-sync processes. Where PYTHONDONTWRITEBYTECODE is set
    (as on CI machines, to keep the work tree clean), each would compile the project's sources again:
    ~0.25 s of every proxy start-up. Bytecode goes to a cache outside the tree instead, shared by the
    processes the tests start (they inherit the environment)."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is None:
        return  # (bytecode is written as usual, next to the sources or where the user said)
    prefix = os.environ.setdefault("PYTHONPYCACHEPREFIX",
                                   os.path.join(tempfile.gettempdir(), f"cpmproxy-pycache-{os.getuid()}"))
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False


# ---------------------------------------------------------------------------
# backend: private Dovecot
# ---------------------------------------------------------------------------

TEST_USERS: dict[str, str] = {name: f"{name}pw" for name in ("alice", "bob", "carol", "dave")}
SAMPLE_STORE_USER = "carol"


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A real Dovecot on 127.0.0.1 shared by the whole session.

    Users alice/bob/carol/dave (password ``<name>pw``), master user
    ``admin``/``adminpw``.  Tests share mailboxes: use unique folder names.
    """
    d = Dovecot(tmp_path_factory.mktemp("dovecot"), users=TEST_USERS)
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def dovecot_direct(dovecot: Dovecot) -> Iterator[Callable[..., imapclient.IMAPClient]]:
    """``dovecot_direct(user, **kw)``: a logged-in IMAPClient straight to Dovecot.

    Keyword arguments go to :meth:`Dovecot.imap_direct` (``tls=``,
    ``password=``).  All clients are logged out after the test.
    """
    clients: list[imapclient.IMAPClient] = []

    def connect(user: str = "alice", **kw: object) -> imapclient.IMAPClient:
        client = dovecot.imap_direct(user, **kw)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            client.logout()
        except Exception:
            client.shutdown()


@pytest.fixture(scope="session")
def sample_store(dovecot: Dovecot) -> list[ManifestEntry]:
    """The sample CPM store seeded once for ``carol``; returns the manifest."""
    return seed_sample_store(dovecot.imap_direct, SAMPLE_STORE_USER)


# ---------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------
