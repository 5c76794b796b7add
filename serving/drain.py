"""Draining on SIGTERM: the port stays open, /health/ready turns 503 at once, new inference requests get 503
with Retry-After, and those in flight finish within the grace period before the worker groups stop."""
import asyncio
import logging

from aiohttp import web

log = logging.getLogger("tpserve.drain")

RETRY_AFTER = 5  # seconds; by then the load balancer has taken this instance out


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0  # inference requests being answered
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, grace_period: float) -> bool:
        """Refuse new work from now on; wait up to `grace_period` for the requests in flight. True when
        every one finished."""
        self.draining = True
        log.info("draining: %d request(s) in flight, up to %.0f s to finish", self.in_flight, grace_period)
        try:
            async with asyncio.timeout(grace_period):
                await self._idle.wait()
        except TimeoutError:
            log.warning("draining: %d request(s) still in flight after the %.0f s grace period; stopping anyway",
                        self.in_flight, grace_period)
            return False
        log.info("draining: every request in flight finished")
        return True


DRAIN = web.AppKey("drain", Drain)
