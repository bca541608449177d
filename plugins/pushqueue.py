"""The push sender's queue: events per user, in order within a user, fair between users (sans-I/O).

One user's events go to the gateway one at a time and in order (a device must not hear of an expunge
before the delivery it undoes); different users' events go side by side, up to ``concurrency`` POSTs at
once, taking turns (round robin), so that neither a busy user nor one whose event the gateway keeps
refusing (retried with backoff) holds up anyone else's. The bound is on all events waiting; when it is
reached, the oldest event of the user with the most waiting is dropped (never one being sent): a user
whose mailbox floods cannot push everyone else's events out.

The plugin does the I/O and the timers: it asks ``next()`` for what to send, and tells ``sent``,
``retry_later`` (then ``due`` when the backoff is over) or ``drop``.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Outbox", "Entry"]


class Entry:
    """One event waiting: its JSON body and the attempts made so far."""

    __slots__ = ("body", "attempts")

    def __init__(self, body: dict) -> None:
        self.body = body
        self.attempts = 0


class Outbox:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.waiting: dict[str, deque[Entry]] = {}  # per user, oldest first; the first may be out
        self.in_flight: dict[str, Entry] = {}  # user -> the entry being POSTed
        self.backing_off: set[str] = set()  # users whose first entry waits for its retry time
        self._turns: deque[str] = deque()  # users whose first entry may go now, in turn order
        self.count = 0  # entries waiting, those being sent included

    def __len__(self) -> int:
        return self.count

    def add(self, user: str, body: dict) -> int:
        """Queue ``body``; returns how many entries were dropped to make room (0 or 1)."""
        dropped = 0
        if self.count >= self.max_queue:
            if not self._drop_oldest_of_busiest():
                return 1  # everything waiting is being sent: the new event is the one that overflows
            dropped = 1
        queue = self.waiting.get(user)
        if queue is None:
            queue = self.waiting[user] = deque()
        queue.append(Entry(body))
        self.count += 1
        if len(queue) == 1 and user not in self.in_flight and user not in self.backing_off:
            self._turns.append(user)
        return dropped

    def next(self) -> tuple[str, Entry] | None:
        """The next entry to send (now in flight), or None."""
        if not self._turns:
            return None
        user = self._turns.popleft()
        entry = self.waiting[user][0]
        self.in_flight[user] = entry
        return user, entry

    def sent(self, user: str, entry: Entry) -> None:
        """``entry``'s POST was answered with success."""
        self._landed(user, entry)

    def drop(self, user: str, entry: Entry) -> None:
        """``entry`` is given up (retries exhausted, or refused for good)."""
        self._landed(user, entry)

    def retry_later(self, user: str, entry: Entry) -> bool:
        """``entry``'s POST failed and will be tried again once ``due(user)``; False if the entry is no
        longer queued (dropped or cleared while it was out): nothing to retry."""
        self.in_flight.pop(user, None)
        entry.attempts += 1
        if not self._is_first(user, entry):
            self._take_turn(user)
            return False
        self.backing_off.add(user)
        return True

    def due(self, user: str) -> None:
        """The backoff of ``user``'s first entry is over."""
        if user in self.backing_off:  # (else its entries were dropped or cleared meanwhile)
            self.backing_off.discard(user)
            self._take_turn(user)

    def clear(self) -> None:
        """Forget everything waiting (answers still to come for entries in flight are ignored)."""
        self.waiting.clear()
        self._turns.clear()
        self.backing_off.clear()
        self.count = 0

    # -- internals -----------------------------------------------------------------------------

    def _is_first(self, user: str, entry: Entry) -> bool:
        queue = self.waiting.get(user)
        return bool(queue) and queue[0] is entry

    def _landed(self, user: str, entry: Entry) -> None:
        if self.in_flight.get(user) is entry:
            del self.in_flight[user]
        if self._is_first(user, entry):
            self.waiting[user].popleft()
            self.count -= 1
        self._take_turn(user)

    def _take_turn(self, user: str) -> None:
        """Put ``user``, whose entry just came back or whose backoff is over, at the end of the turns if
        it has an entry waiting (it is not in them: an entry out or backing off keeps its user out)."""
        queue = self.waiting.get(user)
        if not queue:
            self.waiting.pop(user, None)
        elif user not in self.in_flight and user not in self.backing_off:
            self._turns.append(user)

    def _drop_oldest_of_busiest(self) -> bool:
        """Drop the oldest entry not being sent of the user with the most entries waiting; False if
        every entry waiting is being sent."""
        def out(user: str) -> bool:  # (its first entry is being sent: not that one)
            return self.in_flight.get(user) is self.waiting[user][0]

        def droppable(user: str) -> int:
            return len(self.waiting[user]) - out(user)
        busiest = max(self.waiting, key=droppable, default=None)
        if busiest is None or droppable(busiest) == 0:
            return False
        queue = self.waiting[busiest]
        if out(busiest):
            del queue[1]  # (the next oldest goes)
        else:
            queue.popleft()
        self.count -= 1
        if not queue:
            del self.waiting[busiest]
            if busiest in self._turns:
                self._turns.remove(busiest)
            self.backing_off.discard(busiest)
        return True
