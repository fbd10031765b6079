"""What damage looks like, read without LMDB: the page walk of ``data.mdb`` and the sanity
of a decoded proc record.

Owns :func:`walk_pages` (every page reachable from a branch says it is that page, with
plain reads: LMDB trusts them and aborts on a zeroed page) and :func:`proc_problem`. Used
by the store at opening (``_store``) and by ``pipeproc check`` (``_check``).

May import: the standard library only (no lmdb: the file is checked before LMDB maps it).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import List, Optional

_PROC_KEYS = ("topic", "status", "claimed", "acked", "reclaims", "max_reclaims")


_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2, _P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_HDR = 16  # LMDB page header (64-bit): pgno u64, pad u16, flags u16, lower u16, upper u16
_P_INVALID = (1 << 64) - 1


def walk_pages(path: str, deep: bool = False, limit: int = 20) -> List[str]:
    """Walk the B-trees of the LMDB file ``path/data.mdb`` with plain reads, from its newest
    meta page (call :func:`~pipeproc._layout.check_files` first: the file is long enough).

    Every page reachable from a branch page must say it is that page (its page number) and
    be a branch or a leaf; LMDB itself trusts them, and stops the process with an assertion
    on a zeroed page. ``deep`` also parses every leaf (named databases, overflow pages of
    large values). Returns up to ``limit`` problems (empty: the trees are sound).
    """
    problems: List[str] = []
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        psize = struct.unpack_from("<I", mm, _HDR + 24)[0]
        metas = []
        for off in (0, psize):
            last_pg, txnid = struct.unpack_from("<QQ", mm, off + _HDR + 120)
            metas.append((txnid, last_pg, off))
        _, last_pg, moff = max(metas)
        npages = min(last_pg + 1, size // psize)
        unpack_from = struct.unpack_from
        seen = set()
        # (pgno, what, parent) ; roots: the free db and the main db
        stack = []
        for i, what in ((0, "free-page database"), (1, "main database")):
            root = unpack_from("<Q", mm, moff + _HDR + 24 + 48 * i + 40)[0]
            if root != _P_INVALID:
                stack.append((root, what, None))
        while stack and len(problems) < limit:
            pgno, what, parent = stack.pop()
            where = f"page {pgno} of the {what}" + (f" (child of page {parent})" if parent is not None else "")
            if pgno < 2 or pgno >= npages:
                problems.append(f"{where} is outside the file ({npages} pages)")
                continue
            if pgno in seen:
                problems.append(f"{where} is reached twice")
                continue
            seen.add(pgno)
            base = pgno * psize
            own, flags, lower, upper = unpack_from("<QxxHHH", mm, base)
            if own != pgno or not flags & (_P_BRANCH | _P_LEAF) or flags & (_P_META | _P_OVERFLOW):
                problems.append(f"{where} is damaged (it says page {own}, flags {flags:#x})")
                continue
            if not _HDR <= lower <= upper <= psize or flags & _P_LEAF2:
                problems.append(f"{where} is damaged (bounds {lower}..{upper})")
                continue
            n = (lower - _HDR) >> 1
            branch = bool(flags & _P_BRANCH)
            if not branch and not deep and what != "main database":
                continue
            ptrs = unpack_from(f"<{n}H", mm, base + _HDR)
            for ptr in ptrs:
                if not upper <= ptr <= psize - 8:
                    problems.append(f"{where} is damaged (a node at offset {ptr})")
                    break
                lo, hi, nflags, ksize = unpack_from("<HHHH", mm, base + ptr)
                if branch:
                    stack.append((lo | hi << 16 | nflags << 32, what, pgno))
                    continue
                data = base + ptr + 8 + ksize
                if nflags & _F_BIGDATA:
                    opg = unpack_from("<Q", mm, data)[0]
                    if not 2 <= opg < npages:
                        problems.append(f"{where}: a value's overflow page {opg} is outside the file")
                        continue
                    own, oflags, count = unpack_from("<QxxHI", mm, opg * psize)
                    if own != opg or not oflags & _P_OVERFLOW or opg + count > npages:
                        problems.append(f"overflow page {opg} of the {what} (value on page {pgno}) "
                                        f"is damaged (it says page {own}, flags {oflags:#x})")
                elif nflags & _F_SUBDATA and what == "main database":
                    name = bytes(mm[base + ptr + 8:base + ptr + 8 + ksize]).decode(errors="replace")
                    root = unpack_from("<Q", mm, data + 40)[0]
                    if root != _P_INVALID:
                        stack.append((root, f"database {name!r}", pgno))
    except (struct.error, ValueError, IndexError) as exc:
        problems.append(f"the page structure cannot be read: {exc}")
    finally:
        mm.close()
    return problems


def proc_problem(rec: dict) -> Optional[str]:
    """What is wrong with a decoded proc record, or ``None``."""
    missing = [k for k in _PROC_KEYS if k not in rec]
    if missing:
        return f"fields missing: {', '.join(missing)}"
    if type(rec["topic"]) is not str or rec["status"] not in ("active", "disabled"):
        return "bad topic or status"
    for k in ("claimed", "acked"):
        r = rec[k]
        if r is not None and (type(r) is not list or len(r) != 4
                              or not all(type(v) is int for v in r)):
            return f"bad {k} range {r!r}"
    return None
