"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, without double masking).

Every node of a round's cohort holds an X25519 key pair for that round and
publishes the public key through the coordinator. Two nodes u, v derive the
same pairwise seed s_uv = HKDF-SHA256(X25519(sk_u, pk_v), info=round|u|v).
Node u encodes its example-weighted delta n_u * delta_u in fixed point modulo
M = 2**62 and adds, for every other cohort member v, +PRG(s_uv) when u < v and
-PRG(s_uv) when u > v. In the sum over the whole cohort every mask appears once
with each sign and cancels, so the coordinator learns only sum_u n_u * delta_u
(and, from the clear-text counts, sum_u n_u).

Dropout: when v never submits, the survivors' masks against v do not cancel.
Each survivor u then reveals s_uv (only the seeds shared with dropped nodes);
the coordinator regenerates those masks and removes them. v's own update was
never received, and its submission is refused from then on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 62
MODULUS = 1 << MODULUS_BITS  # int64 holds a sum of two residues without overflow
DEFAULT_SCALE_BITS = 24  # fixed-point resolution 2**-24 ~ 6e-8
SECAGG_ENCODING = "secagg-v1"

IntState = dict[str, torch.Tensor]  # int64 residues in [0, MODULUS)


def generate_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    sk = X25519PrivateKey.generate()
    private = sk.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    public = sk.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def check_public_key(public_key: bytes) -> None:
    """ValueError unless `public_key` is an X25519 key every peer can agree a seed with.

    A low-order point (all zeros, for one) makes every exchange with it fail: a member
    with such a key would stop every honest node from masking, round after round.
    """
    if len(public_key) != 32:
        raise ValueError("public_key must be a raw 32-byte X25519 key")
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public_key))


def pairwise_seed(
    private_key: bytes, peer_public_key: bytes, *, round_id: int, node_a: str, node_b: str
) -> bytes:
    """The 32-byte seed two cohort members share for one round (symmetric in a, b)."""
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    lo, hi = sorted((node_a, node_b))
    info = f"fedjewel-secagg-v1|round={round_id}|{lo}|{hi}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_from_seed(seed: bytes, shapes: Mapping[str, tuple[int, ...]]) -> IntState:
    """Uniform residues mod 2**62 for every tensor, from a per-name PCG64 stream."""
    out: IntState = {}
    for name in sorted(shapes):
        key = hashlib.sha256(seed + b"|" + name.encode()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(key, "big")))
        values = rng.integers(0, MODULUS, size=shapes[name], dtype=np.int64)
        out[name] = torch.from_numpy(np.ascontiguousarray(values)).reshape(shapes[name])
    return out


def encode_fixed(
    state: Mapping[str, torch.Tensor],
    scale_bits: int = DEFAULT_SCALE_BITS,
    *,
    summands: int = 1,
) -> IntState:
    """round(x * 2**scale_bits) as a residue mod 2**62 (negatives wrap around).

    `summands`: how many such encodings will be added (the cohort's size). Each must
    stay within 2**61 / summands, or their sum would wrap around past ±2**61 and decode
    to a wrong value with no error.
    """
    if summands < 1:
        raise ValueError("summands must be at least 1")
    limit = float(1 << (MODULUS_BITS - 1)) / summands
    out: IntState = {}
    for name, t in state.items():
        scaled = torch.round(t.to(torch.float64) * float(1 << scale_bits))
        if bool((scaled.abs() >= limit).any()):
            raise ValueError(f"{name!r} is out of the fixed-point range")
        out[name] = torch.remainder(scaled.to(torch.int64), MODULUS)
    return out


def decode_fixed(
    residues: Mapping[str, torch.Tensor], scale_bits: int = DEFAULT_SCALE_BITS
) -> dict[str, torch.Tensor]:
    """Residues back to float64, reading [2**61, 2**62) as negative."""
    return {
        name: signed_residues(r).to(torch.float64) / float(1 << scale_bits)
        for name, r in residues.items()
    }


def signed_residues(r: torch.Tensor) -> torch.Tensor:
    """Residues mod 2**62 as the signed integers they encode: [2**61, 2**62) negative."""
    return torch.where(r >= MODULUS // 2, r - MODULUS, r)


def add_mod(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], sign: int = 1
) -> IntState:
    if set(a) != set(b):
        raise ValueError("tensor names differ")
    if sign == 1:
        return {k: torch.remainder(a[k] + b[k], MODULUS) for k in a}
    return {k: torch.remainder(a[k] - b[k], MODULUS) for k in a}


def mask_sign(node: str, peer: str) -> int:
    """+1 when node sorts before peer, else -1: each pair's two masks cancel."""
    if node == peer:
        raise ValueError("a node has no mask with itself")
    return 1 if node < peer else -1


def mask_update(
    encoded: Mapping[str, torch.Tensor], node: str, seeds: Mapping[str, bytes]
) -> IntState:
    """Add the pairwise masks of `node` with every peer (peer id -> shared seed)."""
    shapes = {k: tuple(v.shape) for k, v in encoded.items()}
    out: IntState = dict(encoded)
    for peer in sorted(seeds):
        out = add_mod(out, mask_from_seed(seeds[peer], shapes), mask_sign(node, peer))
    return out


def sum_residues(payloads: Iterable[Mapping[str, torch.Tensor]]) -> IntState:
    total: IntState | None = None
    for p in payloads:
        total = dict(p) if total is None else add_mod(total, p)
    if total is None:
        raise ValueError("nothing to sum")
    return total


def within_survivors_range(total: Mapping[str, torch.Tensor], survivors: int, cohort: int) -> bool:
    """Whether every residue of `total` decodes within what the sum of `survivors` honest
    encodings of a cohort of `cohort` can reach (each below 2**61 / cohort: `encode_fixed`
    with `summands=cohort`).

    A wrong revealed seed (or a payload masked with other seeds) leaves masks that do
    not cancel: the residues are then uniform over [0, 2**62), and with fewer survivors
    than the cohort a share (cohort - survivors) / cohort of them falls outside, so a
    model of thousands of parameters is caught for certain. With the whole cohort the
    range is everything: the check says nothing then (nothing was revealed either).
    """
    bound = float(survivors) * float(1 << (MODULUS_BITS - 1)) / float(cohort)
    return all(
        not bool((signed_residues(r).abs().to(torch.float64) >= bound).any())
        for r in total.values()
    )


def remove_dropout_masks(
    total: Mapping[str, torch.Tensor], reveals: Iterable[tuple[str, str, bytes]]
) -> IntState:
    """Undo survivor u's mask against dropped d for each revealed (u, d, s_ud)."""
    shapes = {k: tuple(v.shape) for k, v in total.items()}
    out: IntState = dict(total)
    for survivor, dropped, seed in reveals:
        sign = mask_sign(survivor, dropped)
        out = add_mod(out, mask_from_seed(seed, shapes), -sign)
    return out
