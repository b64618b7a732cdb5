"""The largest log the product serves, in one module that every layer may import.

The constructor parser refuses a CTR of more regions; the store, the journal and the disk-log
readers take a larger count for damage; the wire may bound a region number by it. None of them
may import another just for this number, so it lives here, with nothing else to import.
"""

from __future__ import annotations

#: The product's one maximum region count (``formats/store.md`` §3 says why: two bitmaps of 2^31
#: regions take 512 MiB, 1 PiB of mirror at LVM's default region size, and a region stays far
#: below bit 56, where the journal packs its op code).
MAX_REGION_COUNT = 2**31
