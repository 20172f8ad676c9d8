"""`p2v status --serve HOST:PORT`: the plans' status as a small page that reloads itself
every few seconds (a meta refresh; no JavaScript). `/` lists the plans on the broker,
`/plan/ID` shows one, `/plan/ID.json` is what `p2v status --output json` prints. An
unknown plan is a 404 page, an unreachable broker a 503 page: never a traceback."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from p2v.output import human_size

from .status import PlanStatus, StatusError, Store, read_status

log = logging.getLogger(__name__)

REFRESH_SECONDS = 3
_PLAN = re.compile(r"^/plan/([A-Za-z0-9_.-]{1,200}?)(\.json)?$")
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
.done { background: #dfd; } .failed { background: #fdd; } .running { background: #ffd; }
"""


def _page(title: str, body: str, *, refresh: bool = True) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    ).encode()


def render_plan(status: PlanStatus) -> bytes:
    e = html.escape
    waves = "".join(
        f'<tr class="wave" data-index="{w.index}"><td>{e(w.name)}</td><td>{w.done}</td>'
        f"<td>{w.failed}</td><td>{w.running}</td><td>{w.servers}</td></tr>"
        for w in status.waves
    )
    rows = []
    for s in status.servers:
        rate = f"{human_size(int(s.throughput))}/s" if s.throughput else ""
        eta = f"{s.eta_seconds:.0f} s" if s.eta_seconds is not None else ""
        size = f"{human_size(s.bytes_done)} of {human_size(s.bytes_total)}" if s.bytes_total else ""
        rows.append(
            f'<tr class="server {e(s.state)}" data-name="{e(s.name)}" data-state="{e(s.state)}">'
            f'<td>{e(s.name)}</td><td>{s.wave + 1}</td><td class="state">{e(s.state)}</td>'
            f"<td>{e(s.step)}</td><td>{size}</td><td>{rate}</td><td>{eta}</td>"
            f"<td>{e(s.worker)}</td><td>{e(s.error)}</td></tr>"
        )
    body = (
        f"<p>{e(status.path)} &middot; wave {status.wave + 1} of {len(status.waves)}</p>"
        "<table><tr><th>wave</th><th>done</th><th>failed</th><th>running</th><th>servers</th>"
        f"</tr>{waves}</table><h2>Servers</h2><table><tr><th>server</th><th>wave</th>"
        "<th>state</th><th>step</th><th>bytes</th><th>throughput</th><th>ETA</th>"
        f"<th>worker</th><th>last error</th></tr>{''.join(rows)}</table>"
    )
    return _page(f"p2v plan {status.name}", body)


class _Handler(BaseHTTPRequestHandler):
    store: Store

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: " + format, *args)

    def _send(self, code: int, body: bytes, kind: str = "text/html; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(
            code, _page(f"p2v status: {code}", f'<p class="error">{html.escape(message)}</p>')
        )

    def do_GET(self) -> None:
        import redis

        try:
            if self.path == "/":
                plans = self.store.plans()
                items = "".join(
                    f'<li><a href="/plan/{html.escape(p)}">{html.escape(p)}</a></li>' for p in plans
                )
                self._send(
                    200, _page("p2v plans", f"<ul>{items}</ul>" if plans else "<p>no plans</p>")
                )
                return
            m = _PLAN.match(self.path)
            if not m:
                self._error(404, f"no page {self.path}")
                return
            status = read_status(self.store, m.group(1))
            if m.group(2):
                body = json.dumps(dataclasses.asdict(status), indent=2).encode()
                self._send(200, body, "application/json")
            else:
                self._send(200, render_plan(status))
        except StatusError as exc:
            self._error(404, str(exc))
        except redis.RedisError as exc:
            self._error(503, f"the broker cannot be reached: {' '.join(str(exc).split())}")


def make_server(address: str, broker: str) -> ThreadingHTTPServer:
    from .app import redis_client

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--serve {address!r}: expected HOST:PORT such as 127.0.0.1:8080")
    handler = type("Handler", (_Handler,), {"store": Store(redis_client(broker, patient=False))})
    return ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), handler)


def serve(address: str, broker: str) -> int:
    """Serve the status page until interrupted."""
    server = make_server(address, broker)
    host, port = server.server_address[:2]
    log.info("status page on http://%s:%s/", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
