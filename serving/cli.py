"""`tpserve`: serve every model directory of a model store, or the directories given with -m.

    tpserve --model-store model_store
    tpserve -m /opt/ml/model                 # one directory; the model is named after the folder
    tpserve -m deepspeed=/opt/ml/model       # ...or explicitly
"""
import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from serving import logs
from serving.app import make_app
from serving.config import PROPERTIES_FILE, ConfigError, ModelConfig, ServerSettings, load_model_config
from serving.drain import DRAIN

log = logging.getLogger("tpserve")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_format)
    try:
        configs = collect_models(args.model_store, args.model)
        settings = ServerSettings(model_store=args.model_store, grace_period=args.grace_period,
                                  log_format=args.log_format, access_log=args.access_log)
    except (ConfigError, ValueError) as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    for config in configs:
        log.info("model %s (version %s): engine=%s tensor_parallel_degree=%s model_id=%s entryPoint=%s", config.name,
                 config.version, config.engine, config.world_size, config.model_id or config.model_dir,
                 config.entry_point_module())
    asyncio.run(serve(make_app(configs, settings), args.host, args.port, settings.grace_period))


async def serve(app: web.Application, host: str, port: int, grace_period: float) -> None:
    """Bind at once (models load in the background), serve until SIGTERM/SIGINT, then drain: the port stays
    open answering 503s while requests in flight finish, up to grace_period; then the groups stop."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("Listening on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("signal received: draining (grace period %.0f s)", grace_period)
        stop.clear()  # a second signal ends the grace period early
        waits = [asyncio.create_task(app[DRAIN].drain(grace_period)), asyncio.create_task(stop.wait())]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    finally:
        await runner.cleanup()  # closes the port, then stops every worker group
    log.info("stopped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, help="serve every model directory in this folder; "
                        "POST /models may register more from it")
    parser.add_argument("-m", "--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="serve this model directory (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grace-period", type=float, default=float(os.environ.get("TPSERVE_GRACE_PERIOD", 25)),
                        help="seconds requests in flight get to finish after SIGTERM (env TPSERVE_GRACE_PERIOD; "
                             "default 25, within Kubernetes' default terminationGracePeriodSeconds of 30)")
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("TPSERVE_LOG_FORMAT", "text"),
                        help="log lines as text or as JSON objects (env TPSERVE_LOG_FORMAT)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        default=os.environ.get("TPSERVE_ACCESS_LOG", "true").lower() != "false",
                        help="no line per request (env TPSERVE_ACCESS_LOG=false)")
    args = parser.parse_args(argv)
    if not args.model_store and not args.model:
        parser.error("nothing to serve: give --model-store DIR or -m PATH")
    return args


def collect_models(model_store: Path | None, models: list[str]) -> list[ModelConfig]:
    configs = []
    if model_store is not None:
        if not model_store.is_dir():
            raise ConfigError(f"--model-store {model_store}: no such folder")
        dirs = sorted(d for d in model_store.iterdir() if (d / PROPERTIES_FILE).exists() or (d / "model.py").exists())
        if not dirs:
            raise ConfigError(f"--model-store {model_store}: no folder in it has a {PROPERTIES_FILE} or model.py")
        configs += [load_model_config(d) for d in dirs]
    for spec in models:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = None, spec
        configs.append(load_model_config(Path(path), name=name))
    return configs


if __name__ == "__main__":
    main()
