"""The public docstrings of both clients, written once.

:func:`pipeproc._calls.documented` attaches ``DOCS[name]`` to the method ``name`` of
:class:`pipeproc.PipeProc` and of :class:`pipeproc.aio.AsyncPipeProc` (``live.<name>``: of
:class:`pipeproc.LiveProc` and :class:`pipeproc.aio.AsyncLiveProc`), so that the sync and
the asyncio client document exactly the same contract. The asyncio client's methods are
coroutines with the same arguments, results and errors.

Imports nothing.
"""

from __future__ import annotations

from typing import Dict

_CLAIM_OPTS = """\
        max_reclaims: deliveries of a claim before ``on_max_reclaims_reached`` applies
            (>= 1, or -1 for no limit).
        reclaim_timeout: seconds a claim may stay pending before it is reclaimed (> 0;
            -1 or None: never).
        on_max_reclaims_reached: ``"disable"`` (the proc) or ``"continue"``.
"""

DOCS: Dict[str, str] = {
    "close": """Disconnect this client; the node keeps running.

        Calls in flight (asyncio client) fail with ``no_active_node``.
        """,

    "shutdown": """Stop the node (its workers too) and close the store, then disconnect.

        Args:
            timeout: seconds for the whole shutdown: the request and the node process's
                exit. A node that has not exited by then (stopped, hung) is killed.
        """,

    "commit": """Commit one log (returns its id) or a list of logs atomically (returns a list of ids).

        With the asyncio client, a commit whose await is cancelled may still have been
        written.

        Args:
            logs: ``{"topic": str, "body": dict | list | bytes}`` or a list of such dicts,
                possibly to several topics: all of a list are written or none.

        Returns:
            The id ``"<ms>-<seq>"``, or the list of ids in the order given.

        Raises:
            InvalidTopicFormat, InvalidLogFormat: before anything is written.
            InvalidArgument: the request is above the node's ``max_frame_size``.
        """,

    "range": """Logs of ``topic`` from ``start`` up to ``end`` (oldest first).

        Args:
            topic: the topic name.
            start: lower bound: ``"<ms>-<seq>"``, ``"<ms>"`` or ``":<seq>"`` (None: the start).
            end: upper bound, same forms (None: the end).
            limit: at most this many logs (None, 0 or negative: no limit).
            exclusive: exclude the bound logs themselves (full-id and ``:seq`` bounds).

        Returns:
            The logs, oldest first.

        Raises:
            InvalidTopic: the topic never had a commit.
            InvalidRangeOffset, InvalidToneIdSearch, InvalidArgument: bad bounds.
        """,

    "revrange": """Like :meth:`range`, newest first: ``start`` is the upper bound, ``end`` the lower.

        ``revrange(topic, limit=1)`` is the newest log.

        Args:
            topic, start, end, limit, exclusive: as for :meth:`range`.

        Returns:
            The logs, newest first.

        Raises:
            InvalidTopic, InvalidRangeOffset, InvalidToneIdSearch, InvalidArgument: as
            :meth:`range`.
        """,

    "iter_range": """Yield the logs of a range lazily, fetching ``page_size`` logs per round trip.

        The asyncio client's ``iter_range`` is an async generator (``async for``).

        Args:
            topic, start, end, limit, exclusive: as for :meth:`range`.
            page_size: logs per round trip (>= 1).
            reverse: walk newest first, as :meth:`revrange`.

        Yields:
            Each :class:`~pipeproc.Log` of the range.

        Raises:
            InvalidArgument: ``page_size`` is not an int >= 1; the errors of :meth:`range`.
        """,

    "length": """The number of logs ever committed to ``topic`` (also after the GC removed some).

        Raises:
            InvalidTopic: the topic never had a commit.
        """,

    "topics": """The names of all topics, sorted.

        Returns:
            The topic names.
        """,

    "stats": """Node, workers, topics and procs figures (see the SPEC §3).

        Returns:
            A dict with ``node``, ``workers``, ``topics`` and ``procs``.
        """,

    "proc": """Claim the next logs of ``topic`` for the proc ``name`` (created on first use).

        Args:
            topic: the topic to consume.
            name: the proc's name (unique across topics).
            offset: where the first claim starts (frozen at creation; SPEC §5).
            count: logs per claim (>= 1).
""" + _CLAIM_OPTS + """            These three are frozen at creation.

        Returns:
            A ``Log`` (``count == 1``), a list of logs (``count > 1``), or ``None`` when a
            claim is pending or nothing is left to claim. Pass it as ``claimed=`` to
            :meth:`ack`, :meth:`ack_commit` or :meth:`reclaim` to act on that very claim.

        Raises:
            ProcNameNotUnique, ProcIsDisabled, InvalidRangeOffset, InvalidArgument.
        """,

    "ack": """Ack the pending claim.

        Args:
            name: the proc.
            claimed: the ``Log`` / list that ``proc`` returned: act only on that claim.

        Returns:
            The acked range ``"first..last"``.

        Raises:
            InvalidProc, InvalidAck, StaleClaim.
        """,

    "ack_commit": """Ack the pending claim and commit log(s) in one atomic write.

        Args:
            name: the proc.
            log_or_logs: a log dict or a list of them, as for :meth:`commit`.
            claimed: the ``Log`` / list that ``proc`` returned: act only on that claim.

        Returns:
            ``AckCommit(acked, id)``; ``id`` is a list when a list was given.

        Raises:
            InvalidProc, InvalidAck, StaleClaim, InvalidLogFormat, InvalidTopicFormat.
        """,

    "reclaim": """Drop the pending claim (its logs will be delivered again).

        Args:
            name: the proc.
            claimed: the ``Log`` / list that ``proc`` returned: act only on that claim.

        Returns:
            The last acked range (``""`` if the proc never acked).

        Raises:
            InvalidProc, ProcIsDisabled, NothingToReclaim, StaleClaim.
        """,

    "inspect_proc": """The proc's current state.

        Returns:
            Its :class:`~pipeproc.ProcState`.

        Raises:
            InvalidProc: no such proc.
        """,

    "disable_proc": """Disable the proc (proc / reclaim then fail with ``proc_is_disabled``).

        Returns:
            Its :class:`~pipeproc.ProcState`.

        Raises:
            InvalidProc, ProcAlreadyDisabled.
        """,

    "resume_proc": """Re-activate a disabled proc; resets reclaims, keeps a pending claim.

        Returns:
            Its :class:`~pipeproc.ProcState`.

        Raises:
            InvalidProc, ProcAlreadyActive.
        """,

    "destroy_proc": """Delete the proc (and its system proc, if any).

        Returns:
            Its last :class:`~pipeproc.ProcState`.

        Raises:
            InvalidProc: no such proc.
        """,

    "wait_for_procs": """Block until every named (default: all) active proc on an existing topic has no
        pending claim and nothing left to claim. With the asyncio client, other calls
        proceed meanwhile.

        Args:
            names: proc names (unknown ones are ignored), or None for all.
            timeout: seconds, or None to wait as long as it takes.

        Raises:
            Timeout: ``timeout`` seconds passed first (also when the node does not answer
                at all: the client gives up at ``timeout`` + 1 s).
            ProcIsDisabled: a proc it waits for is (or becomes) disabled by
                ``max_reclaims`` with work left (a dead stage); the message names it and its
                last error. A proc disabled by ``disable_proc`` is not waited for.
        """,

    "available_proc": """Claim work from the first listed proc that does not exist yet, otherwise round
        robin over the listed procs that have work.

        Args:
            specs: ``[{"topic": …, "name": …, "offset": …, "count": …, …}, …]`` (the
                arguments of :meth:`proc`).

        Returns:
            ``(name, Log | list[Log])``, or None when no listed proc has work.

        Raises:
            InvalidArgument, and the errors of :meth:`proc`.
        """,

    "system_proc": """Register a processor run by the node's workers on ``from_``'s logs (SPEC §6).

        Called again with the same ``name`` and ``from_``, it updates the definition
        (``processor``, ``to``, ``count``, ``backoff``) from the next claim on; the proc keeps
        its position, its options and its status (a disabled proc stays disabled until
        ``resume_proc``).

        A failed delivery (the processor raised, its worker died, or it ran longer than
        ``reclaim_timeout``, which is the processor's time limit) is counted toward
        ``max_reclaims`` and delivered again after a back-off.

        Args:
            name: the proc's name.
            from_: the topic, or a list of topics (one proc per topic).
            processor: a module-level function, ``"module:function"`` or a path to a
                ``.py`` file (``"file.py"``: its function ``process``; ``"file.py:func"``).
            to: topic(s) the processor's results are committed to (None: results dropped).
            offset, count: as for :meth:`proc`.
""" + _CLAIM_OPTS + """            backoff: ``(first, cap)`` seconds between deliveries of a claim after a failure,
                doubling with each failure in a row (default 0.1 s up to 30 s; ``(0, 0)``:
                none). It is persisted with the system proc.

        Returns:
            The proc's state, or a list of states (one per topic) when ``from_`` is a list.

        Raises:
            InvalidProcessor: ``processor`` cannot be imported by workers.
            ProcNameNotUnique: the same ``name`` with another ``from_``.
        """,

    "live_proc": """Follow ``topic`` from this process (SPEC §7).

        Args:
            topic: the topic to follow.
            mode: ``"live"`` (logs committed after this call) or ``"all"`` (from the start).
            count: logs per delivery (a list when > 1).

        Returns:
            The live proc (:class:`~pipeproc.LiveProc`, or
            :class:`~pipeproc.aio.AsyncLiveProc` from the asyncio client), its hidden proc
            created on the node.

        Raises:
            InvalidTopicFormat, InvalidArgument: bad arguments.
        """,

    "live.ack": """Ack the last delivery.

        Returns:
            The acked range ``"first..last"``.

        Raises:
            InvalidAck: nothing of it is pending any more.
        """,

    "live.ack_commit": """Ack the last delivery and commit log(s), atomically.

        Returns:
            ``AckCommit(acked, id)``.
        """,

    "live.reclaim": """Hand the last delivery back; it is delivered again.

        Returns:
            The last acked range.
        """,

    "live.inspect": """The hidden proc's state.

        Returns:
            Its :class:`~pipeproc.ProcState`.
        """,

    "live.disable": """Disable the hidden proc (delivery pauses until :meth:`resume`).

        Returns:
            Its :class:`~pipeproc.ProcState`.
        """,

    "live.resume": """Resume the hidden proc.

        Returns:
            Its :class:`~pipeproc.ProcState`.
        """,

    "live.destroy": """Destroy the hidden proc (delivery ends).

        Returns:
            Its last :class:`~pipeproc.ProcState`.
        """,
}

#: ``spawn``'s arguments (both clients).
SPAWN_ARGS = """\
    Args:
        location: the node's directory (created if missing; ``None``: ``./pipeproc_data``,
            or a private temporary directory with ``memory=True``).
        memory: keep the store in memory; nothing of it persists.
        workers: worker processes running system procs (0: none).
        worker_concurrency: processor loops per worker.
        worker_restart_after: recycle a worker after this many executions (0: never).
        gc: ``False``, ``True`` or ``{"min_prune_time": s, "interval": s}``.
        durability: ``"full"`` (fsync per request) or ``"fast"`` (no fsync).
        address: a Unix socket path, or ``("127.0.0.1", port)`` for TCP (port 0: any).
        authkey: the key clients must present (default: a random one).
        max_map_size: cap of the store's size in bytes (``storage_full`` beyond it; its last
            1/16, 512 KiB to 64 MiB, is kept for the GC).
        max_frame_size: the largest request the node accepts, in bytes (default 64 MiB).
            A larger request fails with ``invalid_argument`` before it is sent.
        log_level: the node's log level on stderr (default WARNING).
        timeout: seconds to wait for the node to be ready.
        busy_poll: seconds a waiting end busy-polls for a reply (the sync client) or for
            the next request (the node) before it sleeps (default 50 µs, measured best on
            a virtual machine; 0 turns it off; at most 0.01). It trades a little CPU for
            latency: see README "Guarantees".
        redis: a Redis URL (``redis://``, ``rediss://``, ``unix://``; Redis >= 7.0) instead of
            a node: the store is that server's namespace, and this spawn starts a local
            supervisor and its ``workers`` (SCALE.md; ``location``, ``memory``, ``address``
            and ``authkey`` are then refused). ``shutdown()`` stops the local workers only.
        namespace: with ``redis``: the namespace (default ``"pipeproc"``; a topic name).
        allow: with ``redis``: what the workers may import: module prefixes, directories
            of file processors, or ``"*"`` (none: they run nothing, and say so).
        redis_options: with ``redis``: extra keyword arguments for redis-py (retries and
            socket timeouts shorter than a blocking wait are refused).
"""

#: ``connect``'s arguments (both clients).
CONNECT_ARGS = """\
    Args:
        location: the node's directory (``None``: ``./pipeproc_data``), where its address
            and key are read from.
        address: the node's address (``pp.address``), instead of ``location``.
        authkey: the node's key (``pp.authkey``), with ``address``.
        timeout: seconds to keep trying.
        busy_poll: seconds the sync client busy-polls for a reply before it sleeps
            (default 50 µs; 0 turns it off; at most 0.01). The asyncio client waits in its
            event loop and checks it only.
        redis: a Redis URL (``redis://``, ``rediss://``, ``unix://``; Redis >= 7.0) instead of
            a node: a client of that server's namespace (SCALE.md).
        namespace: with ``redis``: the namespace (default ``"pipeproc"``; a topic name).
        redis_options: with ``redis``: extra keyword arguments for redis-py (retries and
            socket timeouts shorter than a blocking wait are refused).
        durability: with ``redis``: what a write waits for: ``"full"`` (on the primary's
            disk), ``"replicated"`` (and one replica) or ``"fast"`` (nothing). A node's
            durability is its spawn's.
"""
