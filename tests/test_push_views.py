"""Push goes by each offline device's policy and view (found by review): a change hidden from a device is
not pushed to it (a kind it does not synchronize, a folder its policy or its user's preferences hide), a
device whose class turns notifications off is not listed, and a connected device with notifications off
does not silence the pushes an offline one wants. Devices that see a change differently get one event per
view. Real Dovecot and proxy processes, a real HTTPS receiver."""

from __future__ import annotations

import time
import uuid

import pytest

from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via
from tests.test_notify import _Receiver, device
from tests.test_push_admin import _admin_config, _push_config, _wait

SYNC = b"/private/vendor/vendor.cpmproxy/sync"


def _named_device(p, device_id: str, name: str, user: str):
    c = raw_via(p)
    c.command(b"i", b'ID ("name" "%s" "x-cpm-device-id" "%s")' % (name.encode(), device_id.encode()))
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return c


def _ours(devices: list[str], tag: str) -> list[str]:
    """This test's devices (the user's devices of earlier tests are recorded too)."""
    return [d for d in devices if d.endswith(tag)]


@pytest.fixture
def receiver(proxy_certs):
    """The test's push gateway (HTTPS), stopped at the end."""
    r = _Receiver(proxy_certs)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def push_proxy(make_proxy, dovecot, proxy_certs, tmp_path, receiver):
    """``push_proxy(policy)``: a proxy pushing to ``receiver``, with the master user for offline watches."""
    return lambda policy: make_proxy(config_extra=_push_config(receiver, proxy_certs,
                                                               _admin_config(dovecot, tmp_path), policy=policy))


@pytest.mark.parametrize("what", ["hidden-kind", "excluded-folder", "folder-preference", "session-history"])
def test_a_change_hidden_from_every_offline_device_is_not_pushed(push_proxy, receiver, dovecot, what):
    """``sync = { imdn = false }``: an IMDN's arrival is not pushed (its UID and kind named a message no
    device sees); ``exclude_folders``: nothing of an excluded folder; a folder the user turned off
    (``sync`` preference) or a Session History (``sync/session-history`` off): nothing either. The same
    devices are pushed a chat in a visible folder, so the gateway works."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    visible = f"Default/tel:+1444{tag}"
    excluded = f"Secret{tag}"
    off = f"Default/tel:+1443{tag}"
    history = f"Default/tel:+1442{tag}/{tag}-contribution"
    dovecot.deliver(user, visible, make_object("chat"))
    dovecot.deliver(user, excluded, make_object("chat"))
    dovecot.deliver(user, off, make_object("chat"))
    dovecot.deliver(user, history, make_object("session-info"))
    policy = 'sync = { imdn = false, session-history = false }\nexclude_folders = ["Secret*"]\n'
    p = push_proxy(policy)
    device(p, f"tablet-{tag}", user).close()
    phone = device(p, f"phone-{tag}", user)
    r = phone.command(b"m", b'SETMETADATA "%s" (%s "off")' % (off.encode(), SYNC))
    assert r[-1].startswith(b"m OK"), r
    for online in (True, False):  # (the phone's side connection, then the master user's)
        if not online:
            phone.close()
        time.sleep(1.0)
        n = len(receiver.events)
        if what == "hidden-kind":
            dovecot.deliver(user, visible, make_object("imdn"))
        elif what == "excluded-folder":
            dovecot.deliver(user, excluded, make_object("chat", text="secret"))
        elif what == "folder-preference":
            dovecot.deliver(user, off, make_object("chat", text="turned off"))
        else:
            dovecot.deliver(user, history, make_object("chat", text="in a session"))
        time.sleep(2.5)  # (Dovecot announces a change ~0.5 s late)
        uid = dovecot.deliver(user, visible, make_object("chat", text="seen"))
        assert _wait(lambda n=n, uid=uid: any(e["uids"] == [uid] for e in receiver.events[n:])), receiver.events[n:]
        time.sleep(0.5)
        events = receiver.events[n:]
        assert [(e["mailbox"], e["uids"], e["kinds"]) for e in events] == [(visible, [uid], {str(uid): "chat"})], \
            events
        expected = [f"tablet-{tag}"] if online else [f"phone-{tag}", f"tablet-{tag}"]
        assert _ours(events[0]["devices"], tag) == expected, events
    log = p.log()
    assert "Unhandled error" not in log and "#critical]" not in log, log[-3000:]


def test_a_device_whose_class_turns_notifications_off_is_not_listed(push_proxy, receiver, dovecot):
    """Matched on the device id, or on the ID "name" recorded at the device's last login (as at login):
    neither quiet device is listed; the other offline device is."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    visible = f"Default/tel:+1445{tag}"
    dovecot.deliver(user, visible, make_object("chat"))
    policy = ('[[policy.class]]\nname = "quiet"\ndevices = ["tablet-*", "Quiet*"]\nnotifications = "off"\n')
    p = push_proxy(policy)
    device(p, f"tablet-{tag}", user).close()
    _named_device(p, f"watch-{tag}", "QuietWatch", user).close()
    device(p, f"laptop-{tag}", user).close()
    phone = device(p, f"phone-{tag}", user)
    time.sleep(1.0)
    uid = dovecot.deliver(user, visible, make_object("chat", text="x"))
    assert _wait(lambda: any(e["uids"] == [uid] for e in receiver.events)), receiver.events
    phone.close()
    assert [_ours(e["devices"], tag) for e in receiver.events if e["uids"] == [uid]] == [[f"laptop-{tag}"]], \
        receiver.events


def test_a_connected_device_with_notifications_off_does_not_silence_an_offline_one(push_proxy, receiver, dovecot):
    """The phone's class turns notifications off; the tablet's (the base policy: forced) has them: a
    delivery while only the phone is connected is pushed to the tablet (the watch is armed for it)."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    visible = f"Default/tel:+1446{tag}"
    dovecot.deliver(user, visible, make_object("chat"))
    policy = '[[policy.class]]\nname = "quiet"\ndevices = ["phone-*"]\nnotifications = "off"\n'
    p = push_proxy(policy)
    device(p, f"tablet-{tag}", user).close()
    phone = device(p, f"phone-{tag}", user)
    time.sleep(1.0)
    uid = dovecot.deliver(user, visible, make_object("chat", text="x"))
    assert _wait(lambda: any(e["uids"] == [uid] for e in receiver.events)), receiver.events
    ev = next(e for e in receiver.events if e["uids"] == [uid])
    assert _ours(ev["devices"], tag) == [f"tablet-{tag}"], ev
    phone.close()


def test_devices_that_see_a_change_differently_get_one_event_each(push_proxy, receiver, dovecot):
    """An APPEND of a chat and an IMDN (one change, two UIDs): the tablet, whose class synchronizes IMDNs,
    is pushed both; the watch (``imdn`` off, the base policy) only the chat; each event has its own id."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    folder = f"Default/tel:+1447{tag}"
    dovecot.deliver(user, folder, make_object("chat"))
    policy = ('sync = { imdn = false }\n[[policy.class]]\nname = "all"\ndevices = ["tablet-*"]\n'
              'sync = { imdn = true }\n')
    p = push_proxy(policy)
    device(p, f"tablet-{tag}", user).close()
    device(p, f"watch-{tag}", user).close()
    phone = device(p, f"phone-{tag}", user)
    chat, imdn = make_object("chat", text="both"), make_object("imdn")
    r = phone.command(b"a", b'APPEND "%s" {%d+}\r\n%s {%d+}\r\n%s' % (folder.encode(), len(chat), chat,
                                                                     len(imdn), imdn))
    assert r[-1].startswith(b"a OK"), r
    assert _wait(lambda: len([e for e in receiver.events if e["mailbox"] == folder]) >= 2), receiver.events
    time.sleep(1.5)  # (the watch's report of the same change: pushed once)
    phone.close()
    events = sorted((e for e in receiver.events if e["mailbox"] == folder), key=lambda e: len(e["uids"]))
    assert len(events) == 2, events
    alone, both = events
    assert _ours(alone["devices"], tag) == [f"watch-{tag}"], events
    assert _ours(both["devices"], tag) == [f"tablet-{tag}"], events
    assert len(both["uids"]) == 2 and alone["uids"] == [both["uids"][0]], events
    assert alone["kinds"] == {str(both["uids"][0]): "chat"}, events
    assert set(both["kinds"].values()) == {"chat", "imdn"} and alone["id"] != both["id"], events


def test_pushes_of_an_ordinary_folder_do_not_each_ask_the_backend(push_proxy, receiver, dovecot, dovecot_direct):
    """Found by review (helper-79): where the policy hides Session Histories, each push (nobody connected)
    logged in with the master user to ask whether its folder is one (an EXAMINE and a SEARCH), every time:
    "not one" was never remembered. A folder holding messages and no Session History is taken for one
    such for a minute."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    folder = f"Default/tel:+1450{tag}"
    uids = [dovecot.deliver(user, folder, make_object("chat", seed=i)) for i in range(5)]
    p = push_proxy("sync = { session-history = false }\n")
    device(p, f"tablet-{tag}", user).close()
    time.sleep(2)
    before = len(dovecot.log_path.read_text(errors="replace"))
    d = dovecot_direct(user)
    d.select_folder(folder)
    for n, u in enumerate(uids[:4], 1):
        d.add_flags([u], [b"\\Deleted"], silent=True)
        d.uid_expunge([u])
        assert _wait(lambda n=n: len([e for e in receiver.events if e["mailbox"] == folder]) == n)
    after = dovecot.log_path.read_text(errors="replace")[before:]
    logins = [x for x in after.splitlines() if "Login:" in x and "cpmproxy-push" in x]
    assert len(logins) <= 1, logins  # (the first event asks)


_IMDN_FOR_TABLETS_ONLY = ('sync = { imdn = false }\n[[policy.class]]\nname = "all"\ndevices = ["tablet-*"]\n'
                          'sync = { imdn = true }\n')


def _tablet_and_phone_offline(push_proxy, user: str, tag: str):
    """A proxy whose policy hides IMDNs from every device but tablets, and a tablet and a phone of ``user``
    it knows of, both gone offline (their pushes follow)."""
    p = push_proxy(_IMDN_FOR_TABLETS_ONLY)
    device(p, f"tablet-{tag}", user).close()
    device(p, f"phone-{tag}", user).close()
    return p


def test_a_flag_change_of_a_message_no_offline_device_sees_is_not_pushed(push_proxy, receiver, dovecot,
                                                                          dovecot_direct):
    """Found by review (helper-79): a flag change names no message, and went to every device that sees the
    folder, even when the message changed is one none of them sees (an IMDN, ``imdn = false``): a phone
    woken for nothing it can show. The messages that changed are asked of the backend (as the check
    that one did already) and classified: the IMDN's flag change is not pushed, the chat's is; a device
    whose class synchronizes IMDNs is pushed both."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    folder = f"Default/tel:+1451{tag}"
    chat = dovecot.deliver(user, folder, make_object("chat", text="flag me"))
    imdn = dovecot.deliver(user, folder, make_object("imdn"))
    p = _tablet_and_phone_offline(push_proxy, user, tag)
    time.sleep(1.5)
    d = dovecot_direct(user)
    d.select_folder(folder)

    def flagged(uid: int) -> list[dict]:
        n = len(receiver.events)
        d.add_flags([uid], [b"\\Flagged"], silent=True)
        _wait(lambda: any(e["mailbox"] == folder for e in receiver.events[n:]), 4)
        time.sleep(1.0)  # (one change: one event per view, no more)
        return [e for e in receiver.events[n:] if e["mailbox"] == folder]

    events = flagged(imdn)
    assert [(e["event"], _ours(e["devices"], tag)) for e in events] == [("FlagChange", [f"tablet-{tag}"])], events
    events = flagged(chat)
    assert [(e["event"], sorted(_ours(e["devices"], tag))) for e in events] == \
        [("FlagChange", [f"phone-{tag}", f"tablet-{tag}"])], events
    log = p.log()
    assert "Unhandled error" not in log and "#critical]" not in log, log[-3000:]


@pytest.mark.parametrize("connected", [False, True], ids=["all-offline", "one-connected"])
def test_an_expunge_of_messages_no_offline_device_sees_is_not_pushed(push_proxy, receiver, dovecot, dovecot_direct,
                                                                      connected):
    """An expunge names no message, and went to every device that sees the folder, even when what it took
    was an IMDN that a phone hides. The folder's UIDs listed at each expunge tell which messages the next
    one took, and the kinds classified when they were pushed as new tell what they were: the IMDN's
    expunge goes to the tablet only, the chat's to both. The first expunge seen has no listing to compare
    with and goes to both; so does one of a message whose kind was never learnt (delivered before the
    proxy started). Asked on the master user's connection of the offline watch, or on the side connection
    of a device that is connected."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    folder = f"Default/tel:+1452{tag}"
    older_imdn = dovecot.deliver(user, folder, make_object("imdn"))
    p = _tablet_and_phone_offline(push_proxy, user, tag)
    laptop = device(p, f"laptop-{tag}", user) if connected else None
    time.sleep(1.5)
    d = dovecot_direct(user)

    def changed(change, event: str) -> list[tuple[str, list[str]]]:
        n = len(receiver.events)
        change()
        _wait(lambda: any(e["mailbox"] == folder and e["event"] == event for e in receiver.events[n:]), 4)
        time.sleep(1.0)  # (one change: one event per view, no more)
        return [(e["event"], sorted(_ours(e["devices"], tag))) for e in receiver.events[n:] if e["mailbox"] == folder]

    def expunge(uid: int):
        def run():
            d.select_folder(folder)
            d.add_flags([uid], [b"\\Deleted"], silent=True)
            d.uid_expunge([uid])
            d.unselect_folder()
        return run

    news: list[int] = []
    for kind in ("chat", "imdn", "imdn"):
        assert changed(lambda k=kind: news.append(dovecot.deliver(user, folder, make_object(k))), "MessageNew")
    chat, imdn, imdn2 = news
    both = [f"phone-{tag}", f"tablet-{tag}"]
    assert changed(expunge(imdn), "MessageExpunge") == [("MessageExpunge", both)]  # (nothing to compare with)
    assert changed(expunge(imdn2), "MessageExpunge") == [("MessageExpunge", [f"tablet-{tag}"])]
    assert changed(expunge(older_imdn), "MessageExpunge") == [("MessageExpunge", both)]  # (its kind unknown)
    assert changed(expunge(chat), "MessageExpunge") == [("MessageExpunge", both)]
    if laptop is not None:
        laptop.close()
    log = p.log()
    assert "Unhandled error" not in log and "#critical]" not in log and "finding the expunged" not in log, log[-3000:]


def test_past_the_watchs_bound_on_mailboxes_every_change_is_still_pushed(push_proxy, receiver, dovecot,
                                                                          dovecot_direct):
    """``[plugin.notify] max_watch_mailboxes = 0``: the offline watch keeps no mailbox's last STATUS (the
    bound for accounts with thousands of folders; found by review helper-100). A delivery and a flag
    change are still pushed (found by their MODSEQ), and an expunge, which no MODSEQ shows, as one."""
    user = "dave"
    tag = uuid.uuid4().hex[:6]
    folder = f"Default/tel:+1453{tag}"
    first = dovecot.deliver(user, folder, make_object("chat"))
    p = push_proxy("[plugin.notify]\nmax_watch_mailboxes = 0\n")
    device(p, f"tablet-{tag}", user).close()
    time.sleep(1.5)
    d = dovecot_direct(user)

    def changed(change, event: str) -> list[str]:
        n = len(receiver.events)
        change()
        _wait(lambda: any(e["mailbox"] == folder and e["event"] == event for e in receiver.events[n:]), 4)
        time.sleep(1.0)
        return [e["event"] for e in receiver.events[n:] if e["mailbox"] == folder and _ours(e["devices"], tag)]

    def flag():
        d.select_folder(folder)
        d.add_flags([first], [b"\\Flagged"], silent=True)
        d.unselect_folder()

    def expunge():
        d.select_folder(folder)
        d.add_flags([first], [b"\\Deleted"], silent=True)
        d.uid_expunge([first])
        d.unselect_folder()

    assert changed(lambda: dovecot.deliver(user, folder, make_object("chat")), "MessageNew") == ["MessageNew"]
    assert changed(flag, "MessageNew") == ["MessageNew"]  # (told without what changed: no UIDs)
    assert changed(expunge, "MessageExpunge") == ["MessageExpunge"]
    log = p.log()
    assert "Unhandled error" not in log and "#critical]" not in log, log[-3000:]
    assert "keeps the state of 0 mailboxes (max_watch_mailboxes)" in log, log[-3000:]


def _direct_runner(dovecot):
    """A RawIMAP session of alice's straight to Dovecot, and a command runner on it as push's ``_look``
    takes one (each command answered before it returns)."""
    import itertools

    from twisted.internet import defer

    from cpmproxy.proxy.backend import Reply
    from cpmproxy.testing.rawclient import RawIMAP

    c = RawIMAP(dovecot.host, dovecot.port)
    assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
    tags = itertools.count()

    def run(line: bytes):
        tag = b"r%d" % next(tags)
        lines = c.command(tag, line)
        return defer.succeed(Reply(lines[:-1], lines[-1][len(tag) + 1:].rstrip(b"\r\n")))
    return c, run


def _uidvalidity(c, folder: str) -> int:
    status = c.command(b"v", b'STATUS "%s" (UIDVALIDITY)' % folder.encode())
    return int(status[0].rsplit(b" ", 1)[1].strip(b")\r\n"))


def _settled(coroutine):
    """The outcome of a coroutine whose every command is answered at once (done when it returns)."""
    from twisted.internet import defer
    out = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(out.append)
    return out[0]


def test_a_new_message_of_a_folder_replaced_since_is_not_classified_as_the_new_folders(dovecot):
    """Found by review: push classified an event's new messages by EXAMINE of the folder's name, with no look
    at its UIDVALIDITY: a folder deleted and made again meanwhile had another message under the event's UID,
    whose kind (and header fields) went out as the event's (here a hidden IMDN's event told as a chat, to
    devices that do not see IMDNs). The event's message is gone: the event is dropped, as for a folder
    whose facts cannot be read. An event of the new folder is classified as before. (The push plugin's
    ``_look`` on a command runner straight to Dovecot; the policy's folder facts stubbed: none.)"""
    from types import SimpleNamespace

    from twisted.internet import defer

    import plugins.push as push
    from plugins.notify import ChangeEvent
    from plugins.policy import classify
    from plugins.policystatus import MailboxReplaced
    from tests.test_push_admin import _Proxy

    folder = "Default/tel:+1781" + uuid.uuid4().hex[:6]
    c, run = _direct_runner(dovecot)

    imdn = dovecot.deliver("alice", folder, make_object("imdn"))
    old = _uidvalidity(c, folder)
    assert c.command(b"d", b'DELETE "%s"' % folder.encode())[-1].startswith(b"d OK")
    assert dovecot.deliver("alice", folder, make_object("chat")) == imdn  # (the same UID, another message)
    new = _uidvalidity(c, folder)
    assert new != old

    proxy = _Proxy()
    proxy.hooks = SimpleNamespace(by_name={"policy": SimpleNamespace(
        read_folder_facts=lambda *args, **kw: defer.succeed(None))})
    plugin = push.PushPlugin(proxy)
    plugin.include_headers = ["Subject"]
    gone = ChangeEvent("alice", folder, "MessageNew", uidvalidity=old, uids=(imdn,))
    assert _settled(plugin._look(run, gone, None, [])) is None
    failure = _settled(classify(run, folder, [imdn], old))
    assert isinstance(failure.value, MailboxReplaced), failure
    arrived = ChangeEvent("alice", folder, "MessageNew", uidvalidity=new, uids=(imdn,))
    found = _settled(plugin._look(run, arrived, None, []))
    assert found.kinds == {imdn: "chat"} and imdn in found.headers
    c.close()


def test_a_flag_change_of_a_folder_replaced_since_is_dropped(dovecot):
    """Found by review (helper-107): a flag change's messages were classified (for devices that may have
    some hidden) by EXAMINE of the folder's name; when the folder had been deleted and made again
    meanwhile, the classification's MailboxReplaced was taken as "cannot be told", and the event went to
    every device that sees the folder. Its messages are gone with the folder: the event is dropped, as a
    new message's of a replaced folder is. (``_look`` on a runner straight to Dovecot, as above; the
    policy stubbed: IMDNs hidden, no folder facts.)"""
    from types import SimpleNamespace

    from twisted.internet import defer

    import plugins.push as push
    from plugins.notify import ChangeEvent
    from tests.test_push_admin import _Proxy

    folder = "Default/tel:+1782" + uuid.uuid4().hex[:6]
    c, run = _direct_runner(dovecot)

    dovecot.deliver("alice", folder, make_object("imdn"))
    old = _uidvalidity(c, folder)
    assert c.command(b"d", b'DELETE "%s"' % folder.encode())[-1].startswith(b"d OK")
    dovecot.deliver("alice", folder, make_object("chat"))
    new = _uidvalidity(c, folder)
    assert new != old

    proxy = _Proxy()
    proxy.hooks = SimpleNamespace(by_name={"policy": SimpleNamespace(
        read_folder_facts=lambda *args, **kw: defer.succeed(None), hidden_kinds=lambda st, mailbox: {"imdn"})})
    plugin = push.PushPlugin(proxy)
    device = SimpleNamespace(policy=SimpleNamespace(max_size=0, max_age_days=0), folders={})
    flagged = ChangeEvent("alice", folder, "FlagChange", uidvalidity=old)
    assert _settled(plugin._look(run, flagged, 1, [device])) is None
    # (The new folder's own flag change is classified as before: its message is a chat.)
    now = ChangeEvent("alice", folder, "FlagChange", uidvalidity=new)
    found = _settled(plugin._look(run, now, 1, [device]))
    assert found.kinds == {1: "chat"} and found.changed == (1,), found
    c.close()
