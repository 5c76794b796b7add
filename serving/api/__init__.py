"""One module per API surface; each exposes `routes` (an aiohttp RouteTableDef)."""
