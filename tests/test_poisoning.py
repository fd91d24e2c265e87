"""The poisoning experiment's attack parsing and transformation (numbers: docs/security.md)."""

from __future__ import annotations

import pytest
import torch

from shared.poisoning import NO_ATTACK, parse_attack, poison_update


def test_parse_attack() -> None:
    assert parse_attack("scale:100").factor == 100.0
    assert parse_attack("scale:100").label == "scale:100"
    assert parse_attack("signflip").factor == -1.0
    assert parse_attack("signflip").label == "signflip"
    assert parse_attack("SIGNFLIP:10").factor == -10.0
    assert parse_attack("signflip:10").label == "signflip:10"
    assert parse_attack("none") is NO_ATTACK
    for bad in ("scale", "scale:x", "scale:-1", "boost:2", "none:1"):
        with pytest.raises(ValueError):
            parse_attack(bad)


def test_poison_update() -> None:
    delta = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    scaled = poison_update(delta, parse_attack("scale:100"))
    assert torch.equal(scaled["w"], torch.tensor([100.0, -200.0]))
    flipped = poison_update(delta, parse_attack("signflip"))
    assert torch.equal(flipped["w"], torch.tensor([-1.0, 2.0]))
    assert torch.equal(flipped["b"], torch.tensor([-0.5]))
