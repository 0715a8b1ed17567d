"""A bare gRPC server for the benchmarks: the transport ceiling they print beside kvstore."""

from __future__ import annotations

import grpc


def serve_raw_grpc(port: int, ready, service: str, handlers: dict, options=()) -> None:
    """Runs a bare grpc.aio server (uvloop, no interceptor) with ``handlers`` until killed:
    the transport ceiling the benchmarks print beside kvstore. Sets ``ready`` once serving.
    Meant as a ``multiprocessing.Process`` target."""
    import asyncio

    import uvloop

    async def main():
        server = grpc.aio.server(options=list(options))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(main())
