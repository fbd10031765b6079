"""Workflows of the demo's second act (``pipeproc demo --flow``), run by the node's workers.

An order, one durable run of :data:`order` (``demo-order``)::

    reserve ─▶ charge (flaky: fails its first tries, retried) ─▶ pack (slow: the demo kills
    its worker here) ─▶ sleep "cool-off" (durable, no worker held) ─▶ ask-approval ─▶
    wait for the "approval" signal (sent by the demo) ─▶ child run demo-shipping
    (label ─▶ handover) ─▶ receipt

Every step function writes its side effects to a JSON-lines file outside pipeproc (the
``effects`` path, in the demo's location): one ``start`` line when it begins, then ``done``
or ``fail``. The demo counts them: a step that completed (its result is in the run's journal)
must have ``done`` exactly once, however many attempts the run took; a step interrupted by
the kill shows one more ``start`` than its ``done`` and ``fail`` lines.

The workflows are module-level functions of an importable module, so the workers import
them by the path each run records (``pipeproc.demo_flows:order``).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Dict, List

from pipeproc import flow

#: the file of side effects, in the demo's location
EFFECTS_FILE = "demo-flow-effects.jsonl"
#: how the flaky payment is retried: 3 retries, waiting 0.3, 0.6 and 0.6 s (under 1 s, so
#: inside the attempt; the failed tries are recorded as ``retry`` events)
PAYMENT_RETRY = flow.Retry(intervals=[0.3, 0.6, 0.6])
#: tries of the payment that fail before one succeeds
PAYMENT_FAILURES = 2
#: how long the run waits for the approval signal before it rejects the order
APPROVAL_TIMEOUT = 300.0


class PaymentDeclined(Exception):
    """The payment provider failed (transiently): the demo's flaky step raises it."""


def effect(path: str, run_id: str, step: str, event: str, **fields: Any) -> None:
    """Append one side-effect line (``O_APPEND``: lines of concurrent workers never mix)."""
    line = {"t": time.time(), "run": run_id, "step": step, "event": event,
            "pid": os.getpid(), **fields}
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_effects(path: str) -> List[Dict[str, Any]]:
    """Every side-effect line of the file (none when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- steps (side effects)

def reserve_stock(effects: str, run_id: str, items: Dict[str, int]) -> Dict[str, Any]:
    """Reserve the items; the total is 12.50 per item."""
    effect(effects, run_id, "reserve", "start")
    total = round(sum(items.values()) * 12.5, 2)
    effect(effects, run_id, "reserve", "done", total=total)
    return {"items": items, "total": total}


def charge_card(effects: str, run_id: str, amount: float, key: str) -> Dict[str, Any]:
    """Charge the card: fails the first :data:`PAYMENT_FAILURES` tries of each order (the
    tries are counted in the effects file), then succeeds. ``key`` is the idempotency key a
    real provider would get (``ctx.uuid()``: the same on every replay)."""
    tries = 1 + sum(1 for e in read_effects(effects)
                    if e["run"] == run_id and e["step"] == "charge" and e["event"] == "start")
    effect(effects, run_id, "charge", "start", attempt=tries)
    if tries <= PAYMENT_FAILURES:
        effect(effects, run_id, "charge", "fail", attempt=tries)
        raise PaymentDeclined(f"card network timeout (try {tries})")
    effect(effects, run_id, "charge", "done", amount=amount)
    return {"payment_id": f"pay-{key[:12]}", "amount": amount}


def pack_parcel(effects: str, run_id: str, seconds: float) -> Dict[str, Any]:
    """Pack the parcel: slow (``seconds``); the demo kills this worker while it runs."""
    effect(effects, run_id, "pack", "start")
    time.sleep(seconds)
    parcel = f"parcel-{random.randrange(10**6):06d}"
    effect(effects, run_id, "pack", "done", parcel=parcel)
    return {"parcel": parcel}


def notify_approver(effects: str, run_id: str) -> bool:
    """Ask a human to approve the order (the demo answers with the ``approval`` signal)."""
    effect(effects, run_id, "ask-approval", "start")
    effect(effects, run_id, "ask-approval", "done")
    return True


def print_label(effects: str, run_id: str, parcel: str) -> Dict[str, Any]:
    """The shipping label of the parcel, with a tracking number."""
    effect(effects, run_id, "label", "start")
    tracking = f"TRK{random.randrange(10**9):09d}"
    effect(effects, run_id, "label", "done", tracking=tracking)
    return {"parcel": parcel, "tracking": tracking}


def hand_over(effects: str, run_id: str, tracking: str) -> str:
    """Hand the parcel to the carrier."""
    effect(effects, run_id, "handover", "start")
    effect(effects, run_id, "handover", "done", tracking=tracking)
    return "picked up"


def send_receipt(effects: str, run_id: str, payment_id: str, tracking: str) -> str:
    """E-mail the receipt."""
    effect(effects, run_id, "receipt", "start")
    effect(effects, run_id, "receipt", "done", payment_id=payment_id)
    return f"receipt for {payment_id}, tracking {tracking}"


# --------------------------------------------------------------------------- workflows

@flow.workflow(name="demo-shipping")
def shipping(ctx: flow.Context, parcel: str, effects: str) -> Dict[str, Any]:
    """The child run: print the label, hand the parcel over."""
    label = ctx.step("label", print_label, effects, ctx.run_id, parcel)
    status = ctx.step("handover", hand_over, effects, ctx.run_id, label["tracking"])
    return {"tracking": label["tracking"], "status": status}


@flow.workflow(name="demo-order", max_failures=5, lease=30.0)
def order(ctx: flow.Context, items: Dict[str, int], effects: str, pack_seconds: float = 2.0,
          sleep_seconds: float = 1.5) -> Dict[str, Any]:
    """One order, from stock reservation to receipt (see the module docstring)."""
    reserved = ctx.step("reserve", reserve_stock, effects, ctx.run_id, items)
    key = ctx.uuid()  # recorded: every replay charges with the same idempotency key
    payment = ctx.step("charge", charge_card, effects, ctx.run_id, reserved["total"], key,
                       retry=PAYMENT_RETRY)
    parcel = ctx.step("pack", pack_parcel, effects, ctx.run_id, pack_seconds)
    ctx.sleep("cool-off", sleep_seconds)
    ctx.step("ask-approval", notify_approver, effects, ctx.run_id)
    approval = ctx.wait_signal("approval", timeout=APPROVAL_TIMEOUT)
    if not approval or not approval.get("approved"):
        raise flow.Reject(f"order {ctx.run_id} was not approved")
    shipped = ctx.child(shipping, parcel["parcel"], effects)
    receipt = ctx.step("receipt", send_receipt, effects, ctx.run_id, payment["payment_id"],
                       shipped["tracking"])
    ctx.log("order complete", approved_by=approval.get("by"))
    return {"order": ctx.run_id, "total": reserved["total"], "payment": payment["payment_id"],
            "parcel": parcel["parcel"], "tracking": shipped["tracking"], "receipt": receipt}
