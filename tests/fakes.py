"""Small real test doubles: a fake model and a loader whose loads are gated by events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class FakeModel:
    """A 'model' of a given size that records whether it was closed."""

    key: str
    size: int
    closed: bool = False

    @property
    def nbytes(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeLoader:
    """Builds FakeModels; `gate(key)` makes that key's load wait until released."""

    sizes: dict[str, int]
    calls: list[str] = field(default_factory=list)
    failures: dict[str, Exception] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    running: int = 0
    max_running: int = 0
    models: dict[str, FakeModel] = field(default_factory=dict)

    def gate(self, key: str) -> asyncio.Event:
        self.gates[key] = asyncio.Event()
        return self.gates[key]

    def __call__(self, key: str):
        async def load() -> FakeModel:
            self.calls.append(key)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                if key in self.gates:
                    await self.gates[key].wait()
                else:
                    await asyncio.sleep(0)
                if key in self.failures:
                    raise self.failures[key]
                model = FakeModel(key, self.sizes[key])
                self.models[key] = model
                return model
            finally:
                self.running -= 1

        return load


@dataclass
class LocalHostControl:
    """`HostControl` over in-process `ModelHost`s (real hosts, no Ray), keyed by replica."""

    hosts: dict
    delivered: list = field(default_factory=list)

    def replicas(self) -> list[dict]:
        return [host.status() for host in self.hosts.values()]

    async def command(self, command):
        self.delivered.append((command.replica, command.op, command.key))
        return await self.hosts[command.replica].apply(command)
