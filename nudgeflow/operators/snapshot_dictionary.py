"""The preset dictionary of format-4 user snapshots (`operators.snapshot`): frozen bytes.

Deflate with a preset dictionary compresses a small record by what it shares with
the dictionary: here the pickle of an empty user under the default rules, which
holds every field name, every default rule's name and detection fingerprint, and
the shapes of the empty parts. A user's snapshot shrinks from ~1.5 KB to ~0.6 KB
(bench/README.md), and a user held parked between their events costs that much.

Never edit these bytes: every format-4 snapshot ever written needs exactly them to
be read (tests/operators/test_snapshot.py pins their digest). A better dictionary
is a new snapshot FORMAT, with this one kept to read format 4.
"""

from __future__ import annotations

from typing import Final

DICTIONARY: Final = (
    b"\x80\x05\x95\x8e\x02\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07user_id\x94\x8c\x00\x94"
    b"\x8c\tadmission\x94NC\x00\x94h\x04\x87\x94\x8c\x04cart\x94]\x94\x8c\x08sessions\x94N"
    b"]\x94K\x00\x87\x94\x8c\x06timers\x94]\x94\x8c\x05rules\x94}\x94(\x8c\x10cart_abandon"
    b"ment\x94\x8c\x10bc301715bd10ed68\x94N\x86\x94\x8c\x19cart_abandonment_followup\x94"
    b"\x8c\x10930d0b080ff81ad7\x94N\x86\x94\x8c\x10product_interest\x94\x8c\x10dea2f8e85e8"
    b"d8070\x94N\x86\x94\x8c\x13product_retargeting\x94\x8c\x109a37db46ea24d24c\x94N\x86"
    b"\x94\x8c\x0eengaged_reader\x94\x8c\x109b42c8a907bc84b0\x94N\x86\x94\x8c\x0fpricing_r"
    b"evisit\x94\x8c\x1033baa33e35b464b2\x94N\x86\x94\x8c\x12browse_abandonment\x94\x8c"
    b"\x1034bd3154289db5f4\x94N\x86\x94\x8c\rvip_concierge\x94\x8c\x100ca0100022a087e9\x94"
    b"N\x86\x94\x8c\x13new_visitor_welcome\x94\x8c\x1061453a0b79c62f2f\x94N\x86\x94\x8c"
    b"\x0bhigh_intent\x94\x8c\x101a1f936fd7e6b9f5\x94N\x86\x94u\x8c\x06policy\x94h\x04]"
    b"\x94\x86\x94\x8c\rpending_sends\x94]\x94\x8c\x07profile\x94(\x8c\x03new\x94)NNt\x94"
    b"\x8c\tpruned_at\x94N\x8c\tstream_at\x94N\x8c\x06hourly\x94(J\x80\xee6\x00NK\x00NK"
    b"\x00t\x94\x8c\x05daily\x94(J\x00\\&\x05NK\x00NK\x00t\x94\x8c\x0battribution\x94]\x94"
    b"]\x94\x86\x94uNN\x87\x94."
)
