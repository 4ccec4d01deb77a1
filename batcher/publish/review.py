"""``batcher review``: a page on 127.0.0.1 to pick and reject each asset's variants.

Every asset is a row of its variants' thumbnails. A click or ``P`` picks the variant in focus,
``X`` rejects it (again: takes the reject back), the arrow keys move, ``U`` shows only the
assets without a pick. Each decision reads the picks file, changes that asset's entry and
writes the file again atomically: entries the page does not show (stale ones) stay as they are.
The page reads the run's output once, from a folder or a store alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from batcher.errors import UsageError
from batcher.location import StoreURL
from batcher.manifest import Manifest
from batcher.outputs import entries
from batcher.publish.assets import asset_set
from batcher.publish.picks import Decision, load_picks, picks_path, save_decision
from batcher.publish.review_page import PAGE
from batcher.publish.source import RunFiles, open_run_files
from batcher.publish.variants import Asset, Variant

TEXT_CHARS = 400


def serve_review(manifest: Manifest, target: Path | StoreURL, *, port: int) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(manifest, target, port))
    return 0


async def _serve(manifest: Manifest, target: Path | StoreURL, port: int) -> None:
    async with open_run_files(target) as files:
        assets = asset_set(manifest, files)
        review = Review(manifest, assets, files)
        runner = web.AppRunner(review.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"review: cannot listen on 127.0.0.1:{port} ({exc.strerror})") \
                from None
        bound = int(runner.addresses[0][1])
        review.port = bound
        print(f"review: http://127.0.0.1:{bound}/ ({len(assets)} assets; decisions go to "
              f"{picks_path(manifest.path)}; Ctrl-C to stop)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


class Review:
    """The page's state: the assets (variants fixed for the session) and the picks file."""

    def __init__(self, manifest: Manifest, assets: dict[str, Asset], files: RunFiles) -> None:
        self.assets = assets
        self.files = files
        self.path = picks_path(manifest.path)
        self.port = 0
        self.serving = {path for asset in assets.values() for v in asset.variants
                        for path in _paths(v)}
        self.writing = asyncio.Lock()  # one decision at a time reads and rewrites the file

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._local_only])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/assets", self._list)
        app.router.add_get("/file", self._file)
        app.router.add_post("/api/decide", self._decide)
        return app

    @web.middleware
    async def _local_only(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Another site's page in the same browser may not drive this one (DNS rebinding).
        own = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        if request.host not in own:
            raise web.HTTPForbidden(text="review answers only 127.0.0.1")
        if request.method == "POST":
            # A page of another origin may post (a "simple" request needs no preflight): only
            # this page's own origin, and only JSON (which another origin cannot send without
            # a preflight this server never grants).
            origin = request.headers.get("Origin")
            if origin is not None and origin not in {f"http://{host}" for host in own}:
                raise web.HTTPForbidden(text="decisions come only from the review page")
            if request.content_type != "application/json":
                raise web.HTTPUnsupportedMediaType(text="decisions are application/json")
        return await handler(request)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def _list(self, request: web.Request) -> web.Response:
        decisions = await asyncio.to_thread(load_picks, self.path)
        for name, asset in self.assets.items():
            asset.decision = decisions.get(name)
        return web.json_response({"assets": [self._asset(a) for a in self.assets.values()]})

    def _asset(self, asset: Asset) -> dict[str, Any]:
        chosen = asset.chosen()
        return {
            "name": asset.name, "job": asset.job.name, "decided": asset.decided,
            "variants": [self._variant(asset, v, v is chosen) for v in asset.variants],
        }

    def _variant(self, asset: Asset, variant: Variant, chosen: bool) -> dict[str, Any]:
        selector = asset.selector_of(variant)
        data: dict[str, Any] = {
            "label": selector.text(), "ok": variant.ok, "rejected": asset.rejected(variant),
            "picked": asset.picked() is variant, "chosen": chosen, "thumb": None, "text": None,
        }
        record = variant.record
        if record is not None and record.kind == "chat":
            data["text"] = _completion(record.response)
        elif variant.ok:
            data["thumb"] = f"/file?path={quote(_thumb(variant), safe='')}"
        return data

    async def _file(self, request: web.Request) -> web.Response:
        path = request.query.get("path", "")
        if path not in self.serving:  # only the files of the set's variants
            raise web.HTTPNotFound()
        data = await self.files.read(path)
        if data is None:
            raise web.HTTPNotFound()
        kind = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg",
                "jpg": "image/jpeg", "gif": "image/gif", "avif": "image/avif"}
        return web.Response(body=data, content_type=kind.get(path.rsplit(".", 1)[-1],
                                                             "application/octet-stream"),
                            headers={"Cache-Control": "max-age=3600"})

    async def _decide(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            asset = self.assets[body["asset"]]
            variant = asset.variants[int(body["variant"])]
            action = body["action"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise web.HTTPBadRequest(text="expected {asset, variant, action}") from None
        if action not in {"pick", "reject"}:
            raise web.HTTPBadRequest(text="action is pick or reject")
        async with self.writing:
            before = await asyncio.to_thread(load_picks, self.path)
            decisions = dict(before)
            updated = _decide(decisions.get(asset.name), asset, variant, action)
            if updated.pick is None and not updated.rejects:
                decisions.pop(asset.name, None)
            else:
                decisions[asset.name] = updated
            await asyncio.to_thread(save_decision, self.path, before, asset.name, decisions)
            asset.decision = decisions.get(asset.name)
        print(f"review: {asset.name}: {action} {{{asset.selector_of(variant).text()}}}",
              file=sys.stderr, flush=True)
        return web.json_response(self._asset(asset))


def _decide(before: Decision | None, asset: Asset, variant: Variant, action: str) -> Decision:
    """A pick replaces the pick and takes back every reject that covers that variant (a pick
    and a reject of one variant is an error in the file); a reject toggles, and drops a pick
    of that variant."""
    selector = asset.selector_of(variant)
    pick = before.pick if before else None
    rejects = list(before.rejects) if before else []
    if action == "pick":
        return Decision(selector, tuple(r for r in rejects if not r.matches(variant)))
    if selector in rejects:
        rejects.remove(selector)
    else:
        rejects.append(selector)
        pick = None if pick == selector else pick
    return Decision(pick, tuple(rejects))


def _thumb(variant: Variant) -> str:
    """The smallest derived size of the variant's file, else its full-size copy, else it."""
    assert variant.file is not None and variant.record is not None
    own = [e for e in entries(variant.record.derived) if e.get("of") == variant.file.path]
    sizes = sorted((e for e in own if isinstance(e.get("side"), int)), key=lambda e: e["side"])
    if sizes:
        return str(sizes[0]["path"])
    full = next((e for e in own if e.get("role") == "full"), None)
    return str(full["path"]) if full else variant.file.path


def _paths(variant: Variant) -> list[str]:
    return [_thumb(variant)] if variant.ok and variant.record and \
        variant.record.kind != "chat" else []


def _completion(response: Any) -> str:
    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return text[:TEXT_CHARS] if isinstance(text, str) else ""
