"""A node's location is private to its owner, or refused: now in :mod:`pipeproc._platform`
(what only POSIX has). This module re-exports it for the code that still imports it from
here (the client side); it goes away once nothing does.
"""

from ._platform import (  # noqa: F401
    ENTRIES,
    NOFOLLOW,
    SOCKET,
    STORE,
    STORE_FILES,
    TEMP_MARK,
    TEMP_PREFIX,
    check_entries,
    check_entry,
    check_location,
    clean_stale_temp,
    clear_socket_path,
    log,
    open_private,
    read_private,
)
