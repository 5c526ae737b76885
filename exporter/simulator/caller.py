"""A bare signed caller of the simulated API for tests, demos and benchmarks: no retries."""

from __future__ import annotations

from typing import Any

import aiohttp

from exporter.clock import Clock
from exporter.zego.signing import common_params


class SimCaller:
    """POSTs one action with freshly signed common params and returns the decoded envelope."""

    def __init__(self, session: aiohttp.ClientSession, url: str, app_id: int, server_secret: str,
                 clock: Clock) -> None:
        self.session = session
        self.url = url
        self.app_id = app_id
        self._secret = server_secret
        self.clock = clock

    def params(self, action: str, **overrides: str | None) -> dict[str, str]:
        """Signed query parameters; an override replaces one, or removes it when None."""
        params = common_params(action, self.app_id, self._secret, self.clock.time())
        for key, value in overrides.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        return params

    async def call(self, action: str, body: dict[str, Any] | None = None,
                   **overrides: str | None) -> dict[str, Any]:
        async with self.session.post(self.url, params=self.params(action, **overrides),
                                     json=body or {}) as response:
            envelope: dict[str, Any] = await response.json(content_type=None)
            return envelope
