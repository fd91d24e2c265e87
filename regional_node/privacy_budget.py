"""The node's privacy ledger and accountant: epsilon over every noisy update released."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from regional_node.models import PrivacyLedger
from regional_node.store import EventStore
from shared.privacy import epsilon_of_releases


class PrivacyAccountant:
    def __init__(self, store: EventStore, delta: float) -> None:
        self.store = store
        self.delta = delta

    def releases(self) -> list[tuple[float, float, int]]:
        """(noise multiplier, sampling rate, steps) of every release, oldest first."""
        with self.store.sessions() as session:
            rows = session.execute(
                select(
                    PrivacyLedger.noise_multiplier,
                    PrivacyLedger.sampling_rate,
                    PrivacyLedger.steps,
                ).order_by(PrivacyLedger.round_id)
            ).all()
        return [(float(s), float(q), int(k)) for s, q, k in rows]

    def spent(self) -> float:
        return epsilon_of_releases(self.releases(), self.delta)

    def after_one_more(
        self, noise_multiplier: float, sampling_rate: float, steps: int = 1
    ) -> float:
        return epsilon_of_releases(
            [*self.releases(), (noise_multiplier, sampling_rate, steps)], self.delta
        )

    def released(self, round_id: int) -> bool:
        with self.store.sessions() as session:
            return session.get(PrivacyLedger, round_id) is not None

    def record(
        self, round_id: int, noise_multiplier: float, sampling_rate: float, steps: int = 1
    ) -> None:
        """Charge one release; recorded before the update is sent (conservative)."""
        with self.store.sessions() as session, session.begin():
            if session.get(PrivacyLedger, round_id) is None:
                session.add(
                    PrivacyLedger(
                        round_id=round_id,
                        noise_multiplier=noise_multiplier,
                        sampling_rate=sampling_rate,
                        steps=steps,
                        released_at=datetime.now(UTC),
                    )
                )
