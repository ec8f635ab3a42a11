"""How big a message and a frame may be: each limit once, with its reason."""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LARGEST_MAX_MESSAGE_BYTES",
    "MAX_PUSH_FRAME_BYTES",
    "SMALLEST_MAX_MESSAGE_BYTES",
    "max_request_frame_bytes",
]

#: 4 MiB: four times the 1 MB message Channels requires a layer to carry.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The range a daemon's message limit (``--max-message-bytes``) may be set in.
SMALLEST_MAX_MESSAGE_BYTES = 1024
LARGEST_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: A request frame carries one message plus its names and ids (well under 64 KiB), or a
#: SEND_MANY batch of small messages: room for 8 MiB of them whatever the message limit.
_REQUEST_NAMES_BYTES = 64 * 1024
_SMALLEST_MAX_REQUEST_FRAME_BYTES = 8 * 1024 * 1024
#: A PUSH carries one message and the channels of a group's members on one connection:
#: the layer reads the largest message any daemon may allow plus 16 MiB of names
#: (160,000 members of 100-character names), so it never refuses what a daemon sends.
MAX_PUSH_FRAME_BYTES = LARGEST_MAX_MESSAGE_BYTES + 16 * 1024 * 1024


def max_request_frame_bytes(max_message_bytes: int) -> int:
    """The largest frame a daemon whose message limit is ``max_message_bytes`` reads.

    A hostile length prefix can make it buffer no more than that.
    """
    return max(_SMALLEST_MAX_REQUEST_FRAME_BYTES, max_message_bytes + _REQUEST_NAMES_BYTES)
