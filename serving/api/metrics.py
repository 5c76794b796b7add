"""GET /metrics: the Prometheus exposition of this server's registry (serving/metrics.py)."""
from aiohttp import web

from serving.api.observe import METRICS

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].expose()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
