"""Traffic between refs: which arm of a route answers a request, and which arms shadow it.

A route with arms (``[[models]] arms = [...]``) is served by one manager route per arm
(``ROUTE@ARM``), each followed, cached, loaded and swapped as any route is; this module only
chooses. A request goes to one answering arm by weight: with a sticky key (a header or query
parameter) by a stable hash of it, so the same key always lands on the same arm; without one,
at random. An arm that is not ready is skipped for the next ready one (a fallback, counted).
Every shadow arm gets a copy of the request after the answer. Weights can be changed at run
time (the admin API); a config reload starts again from the configured ones.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from serving.config import ArmConfig, ModelConfig

#: ``lookup(source, key)``: the request's header or query value, or None.
Lookup = Callable[[str, str], str | None]


@dataclass(slots=True)
class ArmState:
    config: ArmConfig
    route: str
    weight: float
    answered: int = 0
    fallbacks: int = 0  #: requests it took because the arm chosen first was not ready
    mirrored: int = 0
    mirror_dropped: int = 0


@dataclass
class Split:
    """The arms of one route and how requests are shared between them."""

    route: str
    arms: list[ArmState]
    sticky: tuple[str, str] | None
    mirror_queue: int
    mirror_in_flight: int = 0
    #: Requests of this route being answered now (shadow copies wait for 0).
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Shadow copies waiting: (arm, body, codec, payload-log event id).
    pending: deque[tuple[ArmState, bytes, Any, str | None]] = field(default_factory=deque)
    mirroring: asyncio.Task[None] | None = None
    _bounds: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, model: ModelConfig) -> Split:
        source, _, key = model.sticky.partition(":")
        split = cls(
            model.name,
            [ArmState(a, model.arm_route(a), a.weight) for a in model.arms],
            (source, key) if model.sticky else None,
            model.mirror_queue,
        )
        split._weigh()
        return split

    def __post_init__(self) -> None:
        #: The arms that answer, and the shadow arms (fixed: arms change with the config).
        self.answering = [a for a in self.arms if not a.config.shadow]
        self.shadows = [a for a in self.arms if a.config.shadow]

    def arm(self, name: str) -> ArmState:
        """Raises KeyError naming the arms."""
        for arm in self.arms:
            if arm.config.name == name:
                return arm
        raise KeyError(f"{self.route} has no arm {name[:64]!r}; arms: {self.names()}")

    def names(self) -> str:
        return ", ".join(a.config.name for a in self.arms)

    def set_weights(self, weights: dict[str, float]) -> None:
        """New weights for some answering arms (the others keep theirs).

        Raises:
            KeyError: no such arm; ValueError: a shadow arm, a weight < 0, or none left > 0.
        """
        arms = {name: self.arm(name) for name in weights}
        for name, weight in weights.items():
            if arms[name].config.shadow:
                raise ValueError(f"{name!r} is a shadow arm: it answers nobody, it has no weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
                raise ValueError(f"weight of {name!r}: expected a number >= 0")
        after = {a.config.name: weights.get(a.config.name, a.weight) for a in self.answering}
        if not any(w > 0 for w in after.values()):
            raise ValueError("every answering arm would weigh 0: nothing would answer")
        for name, weight in weights.items():
            arms[name].weight = float(weight)
        self._weigh()

    def _weigh(self) -> None:
        total = sum(a.weight for a in self.answering)
        running = itertools.accumulate(a.weight / total for a in self.answering)
        self._bounds = list(running)

    def order(self, lookup: Lookup | None) -> Iterator[ArmState]:
        """The answering arms: the chosen one (its sticky key's, or a random draw's), then,
        asked for only when it is not ready, the others that weigh anything, heaviest first."""
        arms = self.answering
        index = min(bisect.bisect_right(self._bounds, self._position(lookup)), len(arms) - 1)
        while arms[index].weight == 0:  # a zero-width slot at the boundary: the next one
            index = (index + 1) % len(arms)
        chosen = arms[index]
        yield chosen
        yield from sorted(
            (a for a in arms if a is not chosen and a.weight > 0), key=lambda a: -a.weight
        )

    def _position(self, lookup: Lookup | None) -> float:
        if self.sticky is not None and lookup is not None:
            value = lookup(*self.sticky)
            if value:
                return stable_position(value)
        return random.random()

    def to_dict(self) -> dict[str, Any]:
        total = sum(a.weight for a in self.answering) or 1.0
        return {
            "route": self.route,
            "sticky": ":".join(self.sticky) if self.sticky else None,
            "mirror_queue": self.mirror_queue,
            "mirror_in_flight": self.mirror_in_flight,
            "mirror_pending": len(self.pending),
            "arms": [
                {
                    "arm": a.config.name,
                    "route": a.route,
                    "ref": a.config.uri,
                    "shadow": a.config.shadow,
                    "weight": a.weight,
                    "share": None if a.config.shadow else round(a.weight / total, 6),
                    "answered": a.answered,
                    "fallbacks": a.fallbacks,
                    "mirrored": a.mirrored,
                    "mirror_dropped": a.mirror_dropped,
                }
                for a in self.arms
            ],
        }


def stable_position(key: str) -> float:
    """A point in [0, 1) that depends on ``key`` only (the same in every process and run)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def splits_of(models: tuple[ModelConfig, ...]) -> dict[str, Split]:
    return {m.name: Split.of(m) for m in models if m.arms}
