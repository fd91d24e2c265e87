"""The node's side of secure aggregation: keys, masking, and seed reveals for dropouts."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import torch

from regional_node.client import CoordinatorClient, CoordinatorError
from shared.privacy_schemas import SecAggState
from shared.secagg import encode_fixed, generate_keypair, mask_update, pairwise_seed
from shared.serialization import bytes_to_state, state_to_bytes

# Later deadlines of one unsealed round the node waits through (see `mask`).
MAX_DEADLINE_EXTENSIONS = 3

log = logging.getLogger("fedjewel.node.secagg")


class SecAggAborted(Exception):
    """This node cannot take part in the round's secure aggregation (not in the cohort...)."""


@dataclass
class RoundKeys:
    private_key: bytes
    public_key_b64: str


def masked_payload(
    delta_bytes: bytes,
    num_examples: int,
    node_id: str,
    round_id: int,
    private_key: bytes,
    state: SecAggState,
) -> bytes:
    """n * delta in fixed point plus this node's pairwise masks with the sealed cohort."""
    delta = bytes_to_state(delta_bytes)
    weighted = {k: v.to(torch.float64) * num_examples for k, v in delta.items()}
    try:
        seeds = {
            m.node_id: pairwise_seed(
                private_key,
                base64.b64decode(m.public_key),
                round_id=round_id,
                node_a=node_id,
                node_b=m.node_id,
            )
            for m in state.cohort
            if m.node_id != node_id
        }
    except ValueError as exc:  # a peer's unusable key (the coordinator refuses them now)
        raise SecAggAborted(f"cannot agree a seed with the cohort: {exc}") from exc
    try:
        encoded = encode_fixed(weighted, summands=len(state.cohort))
    except ValueError as exc:  # num_examples x delta too large for the cohort's sum
        raise SecAggAborted(f"update too large for secure aggregation: {exc}") from exc
    return state_to_bytes(mask_update(encoded, node_id, seeds))


class SecureAggregationAgent:
    def __init__(
        self, client: CoordinatorClient, node_id: str, *, wait_seconds: float, poll_seconds: float
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._keys: dict[int, RoundKeys] = {}  # in memory only: a restart forgets them

    async def join(self, round_id: int) -> None:
        """Publish a fresh key pair for the round (before training, so the cohort can seal)."""
        keys = self._keys.get(round_id)
        if keys is None:
            private, public = generate_keypair()
            keys = RoundKeys(private, base64.b64encode(public).decode())
            self._keys[round_id] = keys
        await self.client.publish_secagg_key(round_id, keys.public_key_b64)

    def _give_up_at(self, round_deadline: datetime | None) -> float:
        """Monotonic time to stop waiting for the seal: `wait_seconds` past the deadline."""
        wait = self.wait_seconds
        if round_deadline is not None:
            wait += max(0.0, (round_deadline - datetime.now(UTC)).total_seconds())
        return time.monotonic() + wait

    async def mask(
        self,
        round_id: int,
        delta_bytes: bytes,
        num_examples: int,
        round_deadline: datetime | None = None,
    ) -> bytes:
        """Wait for the cohort to seal, then mask. The coordinator seals at TARGET_UPDATES
        keys or at the round's deadline, so the wait lasts `wait_seconds` past that
        deadline (a node that gave up earlier would sit in the cohort without an update,
        and with one node down every round would be redone). A round with too few keys at
        its deadline gets a later one from the coordinator: the wait follows it, since the
        key this node published stays and can still be sealed into the cohort (at most
        MAX_DEADLINE_EXTENSIONS times: with too few nodes alive the deadline moves for
        ever, and the node must go back to its loop; sealed in later without an update,
        it is a dropout that its peers' reveals recover)."""
        keys = self._keys.get(round_id)
        if keys is None:
            raise SecAggAborted(f"no key for round {round_id}")
        give_up = self._give_up_at(round_deadline)
        extensions = 0
        while True:
            state = await self.client.secagg_state(round_id)
            if state.round_state != "open":
                raise SecAggAborted(f"round {round_id} closed (redone or superseded)")
            if state.sealed:
                break
            if time.monotonic() > give_up:
                try:
                    rnd = await self.client.current_round()
                except (CoordinatorError, httpx.HTTPError) as exc:
                    log.warning("round %s: could not re-read the round: %s", round_id, exc)
                    await asyncio.sleep(self.poll_seconds)
                    continue  # the next state read tells whether the coordinator is back
                pushed_back = (
                    rnd is not None
                    and rnd.round_id == round_id
                    and rnd.state == "open"
                    and rnd.deadline is not None
                    and (round_deadline is None or rnd.deadline > round_deadline)
                )
                if not pushed_back or extensions >= MAX_DEADLINE_EXTENSIONS:
                    raise SecAggAborted(f"cohort of round {round_id} not sealed in time")
                assert rnd is not None
                extensions += 1
                log.info(
                    "round %s: too few keys by its deadline, the coordinator moved it to %s; "
                    "waiting on (%d of %d)",
                    round_id,
                    rnd.deadline.isoformat(),
                    extensions,
                    MAX_DEADLINE_EXTENSIONS,
                )
                round_deadline = rnd.deadline
                give_up = self._give_up_at(round_deadline)
            await asyncio.sleep(self.poll_seconds)
        if self.node_id not in {m.node_id for m in state.cohort}:
            raise SecAggAborted(f"not in the sealed cohort of round {round_id}")
        return await asyncio.to_thread(
            masked_payload,
            delta_bytes,
            num_examples,
            self.node_id,
            round_id,
            keys.private_key,
            state,
        )

    async def answer_reveals(self) -> None:
        """Reveal seeds with dropped peers of rounds we submitted to; forget closed rounds."""
        for round_id in sorted(self._keys):
            state = await self.client.secagg_state(round_id)
            if state.round_state != "open":
                del self._keys[round_id]
                continue
            cohort = {m.node_id: m.public_key for m in state.cohort}
            if (
                not state.dropped
                or self.node_id not in cohort
                or self.node_id in state.dropped
                or self.node_id in state.revealed_by
                or self.node_id not in state.submitted
            ):
                continue
            if set(state.dropped) & set(state.submitted):
                # A peer called dropped whose masked update is stored: its seeds with us
                # would unmask that update. Never reveal them (the round is redone).
                log.warning("round %s: dropped peers have submitted; no seeds revealed", round_id)
                continue
            private = self._keys[round_id].private_key
            seeds = {
                d: pairwise_seed(
                    private,
                    base64.b64decode(cohort[d]),
                    round_id=round_id,
                    node_a=self.node_id,
                    node_b=d,
                ).hex()
                for d in state.dropped
            }
            await self.client.reveal_secagg_seeds(round_id, seeds)
            log.info("revealed seeds with dropped nodes %s for round %s", state.dropped, round_id)

    def forget(self, round_id: int) -> None:
        self._keys.pop(round_id, None)
