"""Regression tests for what an independent review of the Redis backend found (issue 18).

Each test is a finding's reproduction: a password given as ``?password=``, out of memory,
a processor that ends its worker with status 0, a recycling worker taking no new claim,
a due timeout applied before ``proc``'s status check, and a call's own proc expired even
when more than 100 others are due.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

import pipeproc
from helpers import wait_until
from redis_server import fresh_namespace

M = "procmods.redis_mods"


def _text(pp, exc=None) -> str:
    return " ".join([repr(pp), str(pp.stats().get("redis")), str(exc or "")])


def test_password_in_the_query_is_redacted(redis_server, redis_url):
    parts = urlsplit(redis_url)
    password = parts.password
    assert password
    url = f"redis://{parts.hostname}:{parts.port}/0?password={password}"
    pp = pipeproc.connect(redis=url, namespace=fresh_namespace())
    try:
        pp.commit({"topic": "t", "body": {"n": 1}})
        assert password not in _text(pp)
    finally:
        pp.close()
    wrong = f"redis://{parts.hostname}:{parts.port}/0?password=W{password}"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=wrong, namespace=fresh_namespace(), timeout=1)
    assert e.value.code == "auth_failed"
    assert password not in str(e.value) and f"W{password}" not in str(e.value)


@pytest.mark.timeout(60)
def test_out_of_memory_is_storage_full_and_writes_nothing(redis_server, rpp):
    rpp.commit({"topic": "t", "body": {"n": 0}})
    redis_server.call("CONFIG", "SET", "maxmemory", "1")
    try:
        with pytest.raises(pipeproc.PipeProcError) as e:
            rpp.commit([{"topic": "t", "body": {"n": 1}}, {"topic": "u", "body": {"n": 2}}])
        assert e.value.code == "storage_full"
        with pytest.raises(pipeproc.PipeProcError) as e:
            rpp.proc("t", name="p")
        assert e.value.code == "storage_full"
    finally:
        redis_server.call("CONFIG", "SET", "maxmemory", "0")
    assert rpp.length("t") == 1 and "u" not in rpp.topics()


def _spawn(redis_url, **kw):
    kw.setdefault("allow", [M])
    return pipeproc.spawn(redis=redis_url, namespace=fresh_namespace(), **kw)


@pytest.mark.timeout(90)
def test_a_processor_that_exits_with_0_is_a_death_that_counts(redis_url):
    pp = _spawn(redis_url, workers=1)
    try:
        pp.system_proc(name="q", from_="in", processor=f"{M}:quits", max_reclaims=2,
                       reclaim_timeout=-1)
        pp.commit({"topic": "in", "body": {"n": 1}})
        wait_until(lambda: pp.inspect_proc("q").status == "disabled", 30, what="disabled")
        st = pp.inspect_proc("q")
        assert st.reclaims == 2 and st.last_error["type"] == "WorkerDied"
    finally:
        pp.shutdown()


@pytest.mark.timeout(90)
def test_a_recycling_worker_takes_no_new_claim(redis_url):
    pp = _spawn(redis_url, workers=1, worker_restart_after=1)
    try:
        pp.system_proc(name="i", from_="in", processor=f"{M}:inc", to="out")
        pp.commit([{"topic": "in", "body": {"n": n}} for n in range(4)])
        pp.wait_for_procs(["i"], timeout=30)
        assert pp.length("out") == 4
        st = pp.inspect_proc("i")
        # every claim was acked by the worker that took it: none was released unprocessed
        assert st.reclaims == 0 and st.last_error is None
        assert sum(w["executions"] for w in pp.stats()["workers"]) <= 1
    finally:
        pp.shutdown()


def test_proc_applies_a_due_timeout_before_its_status_check(rpp):
    rpp.commit({"topic": "t", "body": {"n": 1}})
    assert rpp.proc("t", name="p", reclaim_timeout=0.2, max_reclaims=1) is not None
    time.sleep(0.4)  # past the deadline: no supervisor runs, the call applies it
    with pytest.raises(pipeproc.PipeProcError) as e:
        rpp.proc("t", name="p", reclaim_timeout=0.2, max_reclaims=1)
    assert e.value.code == "proc_is_disabled"


def test_a_calls_own_proc_expires_even_when_many_are_due(rpp):
    rpp.commit({"topic": "t", "body": {"n": 1}})
    for i in range(105):
        assert rpp.proc("t", name=f"x{i}", reclaim_timeout=0.2) is not None
    first = rpp.proc("t", name="target", reclaim_timeout=0.2)
    time.sleep(0.4)
    again = rpp.proc("t", name="target", reclaim_timeout=0.2)
    assert again is not None and again.id == first.id
    with pytest.raises(pipeproc.PipeProcError) as e:
        rpp.ack("target", claimed=first)
    assert e.value.code == "stale_claim"
