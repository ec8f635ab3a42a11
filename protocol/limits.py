"""How big a message and a frame may be: each limit once, with its reason."""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LARGEST_CAPACITY",
    "LARGEST_MAX_MESSAGE_BYTES",
    "LONGEST_EXPIRY_S",
    "MAX_ACK_PAIRS",
    "MAX_PATTERN_CHARS",
    "MAX_PUSH_FRAME_BYTES",
    "MAX_UNCONFIRMED_GROUP_SENDS",
    "MAX_UNSETTLED_SENDS",
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


#: Most (channel, count) pairs the layer puts in one ACK; it sends more as several.
#: A layer acknowledges one pair per channel read since its last write (a few, rarely
#: hundreds), and 256 pairs of 100-character names is a 27 KiB frame a daemon handles
#: in well under a millisecond. A daemon's item bound (``--max-batch``) is never lower.
MAX_ACK_PAIRS = 256
#: The longest expiry, of a message or a membership, a daemon may allow: 100 years.
#: Every deadline and time-to-live made from it stays representable: in ms it is 3.2e12,
#: far inside msgpack's uint64; Redis's 13-digit deadlines in ms last until 2286;
#: PostgreSQL's timestamps until 294276.
LONGEST_EXPIRY_S = 100 * 365 * 86_400
#: The largest capacity a daemon may allow: PostgreSQL stores capacities as ``integer``.
LARGEST_CAPACITY = 2**31 - 1
#: The longest ``channel_capacity`` pattern in a HELLO, in characters. It matches names
#: shorter than 100 characters: what ``fnmatch.translate`` (Channels' glob keys) makes
#: of the longest glob, every character escaped, is about 210.
MAX_PATTERN_CHARS = 256
#: Most SENDs with a ``seq`` one client leaves unsettled at once (written, and neither
#: answered nor confirmed): what a layer resends after a reconnect. A daemon remembers
#: which of a client's latest that many seqs it did not store, so a retry is stored once
#: (docs/flow.md); 1,024 is sixteen full windows of the default 64.
MAX_UNSETTLED_SENDS = 1024
#: Most numbered GROUP_SENDs one client leaves unconfirmed at once (docs/flow.md); its
#: numbered SENDs take the rest of ``MAX_UNSETTLED_SENDS``, so that, together, no resend
#: is older than what a daemon remembers of the client's seqs.
MAX_UNCONFIRMED_GROUP_SENDS = MAX_UNSETTLED_SENDS // 4
