"""Seeds that every process derives alike: the one place the data modules draw randomness from.

A sync run over the network equals ``lte-sim`` bit for bit only if every worker process draws the
same sample order, augmentation and mixing for (seed, head, step) as the emulator does; so seeds
are mixed by a keyed hash (BLAKE2b), never by Python's per-process ``hash()``, and each draw gets
its own ``torch.Generator`` rather than the global one.
"""

from __future__ import annotations

import hashlib

import torch


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike Python's hash()).

    The parts are joined as decimal text and hashed with BLAKE2b (8-byte digest, little-endian,
    top bit cleared so the value fits ``torch.Generator.manual_seed``).
    """
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, independent of torch's global state."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
