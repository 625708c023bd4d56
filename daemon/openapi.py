"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Built here rather than kept as a JSON file, so the error answers every operation shares are written once.
tests/test_openapi.py fails when a route the app registers has no operation here (or one here has no route): a
new endpoint adds an entry to PATHS, with every status it answers.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from daemon.http_api import MAX_PAGE

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these properties (extra ones allowed: a client must ignore fields it does not know)."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


STRING, INTEGER, BOOLEAN, NUMBER = ({"type": kind} for kind in ("string", "integer", "boolean", "number"))
REQUEST_STATES = ["queued", "processing", "completed", "completed_with_errors", "failed", "cancelled"]
IMAGE_STATES = ["pending", "retrying", "downloaded", "compressed", "kept_original", "failed", "cancelled"]

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": STRING, "message": STRING}, {"field": STRING, "limit": INTEGER, "retry_after": INTEGER,
                                                       "request_id": STRING}),
    "InvalidCsv": {"allOf": [ref("Error"), obj({"problems": {"type": "array", "items": obj(
        {"line": INTEGER, "column": STRING, "reason": STRING})}})]},
    "NotFinished": {"allOf": [ref("Error"), obj({}, {"status": {"enum": REQUEST_STATES},
                                                     "progress": ref("Progress")})]},
    "Progress": obj({"images": INTEGER, "done": INTEGER, "failed": INTEGER, "pending": INTEGER},
                    {"cancelled": INTEGER}),
    "Accepted": obj({"request_id": STRING, "status": {"const": "queued"}, "products": INTEGER, "images": INTEGER,
                     "status_url": STRING}),
    "Image": obj({"input_url": STRING, "status": {"enum": IMAGE_STATES}, "output_url": nullable("string"),
                  "bytes_in": nullable("integer"), "bytes_out": nullable("integer"), "width": nullable("integer"),
                  "height": nullable("integer"), "format": nullable("string"), "attempts": nullable("integer"),
                  "quality": nullable("integer"), "ssim": nullable("number"), "note": nullable("string"),
                  "error": nullable("string")}),
    "Compression": obj({"bytes_in": INTEGER, "bytes_out": INTEGER, "bytes_saved": INTEGER, "scored": INTEGER,
                        "ssim_mean": nullable("number"), "ssim_lowest": nullable("number")}),
    "Product": obj({"serial": STRING, "product_name": STRING, "images": {"type": "array", "items": ref("Image")}}),
    "Attempt": obj({"attempt": INTEGER, "outcome": {"enum": ["delivered", "retrying", "failed", "gone"]},
                    "status_code": nullable("integer"), "error": nullable("string"), "latency_ms": NUMBER,
                    "retry_in": nullable("number"), "at": STRING}),
    "Delivery": obj({"message_id": STRING, "listener": STRING, "round": INTEGER, "state": STRING,
                     "attempts": {"type": "array", "items": ref("Attempt")}}),
    "Notification": obj({"webhook_id": nullable("string"), "kind": STRING, "status": STRING, "verified": BOOLEAN,
                         "received_at": STRING}),
    "Status": obj({
        "request_id": STRING, "status": {"enum": REQUEST_STATES},
        "source": obj({"kind": {"enum": ["upload", "inbox"]}, "name": STRING}),
        "created_at": STRING, "updated_at": STRING, "completed_at": nullable("string"), "progress": ref("Progress"),
        "compression": ref("Compression"), "status_url": STRING, "webhooks": {"type": "array", "items": ref("Delivery")},
        "notifications": {"type": "array", "items": ref("Notification")},
    }, {
        "products": {"type": "array", "items": ref("Product")},
        "page": obj({"offset": INTEGER, "limit": nullable("integer"), "products_total": INTEGER,
                     "next": nullable("string")}),
    }),
    "Health": obj({"status": {"enum": ["ok", "degraded"]}}, {"reasons": {"type": "array", "items": STRING}}),
    "Summary": obj({
        "request_id": STRING, "status": {"enum": REQUEST_STATES},
        "source": obj({"kind": {"enum": ["upload", "inbox"]}, "name": STRING}),
        "created_at": STRING, "updated_at": STRING, "completed_at": nullable("string"), "progress": ref("Progress"),
        "compression": ref("Compression"), "status_url": STRING,
    }),
    "RequestList": obj({"requests": {"type": "array", "items": ref("Summary")}, "next": nullable("string")}),
}


def answer(description: str, schema: Schema | None = None, media: str = JSON,
           headers: dict[str, Schema] | None = None) -> Schema:
    body: Schema = {"description": description}
    if schema is not None:
        body["content"] = {media: {"schema": schema}}
    if headers:
        body["headers"] = {name: {"schema": value} for name, value in headers.items()}
    return body


def error(description: str, schema: str = "Error") -> Schema:
    return answer(description, ref(schema))


# Answers any operation may give, by the middleware rather than the handler.
UNAUTHORIZED = error("`server.tokens` is set and no valid `Authorization: Bearer <token>` was sent")
UNAVAILABLE = answer("the disk is full (`disk_full`) or the database cannot be reached (`database_unreachable`): "
                     "nothing was recorded; try again after `Retry-After` seconds", ref("Error"),
                     headers={"Retry-After": INTEGER})
BAD_BODY = error("`invalid_body`: the body's Content-Encoding does not decode")
CSV = "text/csv"

REQUEST_ID = {"name": "request_id", "in": "path", "required": True, "schema": STRING,
              "description": "a request id as `POST /upload` answered it"}


def operation(operation_id: str, summary: str, responses: dict[int, Schema], parameters: list[Schema] | None = None,
              body: Schema | None = None, token: bool = True, database: bool = True) -> Schema:
    """One operation, with the answers every operation shares added: 401 (with tokens), 503 (the database)."""
    shared = {**({401: UNAUTHORIZED} if token else {}), **({503: UNAVAILABLE} if database else {}),
              **({400: BAD_BODY} if body is not None else {})}
    op: Schema = {"operationId": operation_id, "summary": summary, "responses": {str(code): value for code, value in
                                                    sorted({**shared, **responses}.items())}}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    if not token:
        op["security"] = []
    return op


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# Where a new request's id leads: what a client (and schemathesis' stateful tests) can do with it next.
REQUEST_LINKS = {operation_id: {"operationId": operation_id, "parameters": {"request_id": "$response.body#/request_id"}}
                 for operation_id in ("getStatus", "exportRequest", "retryRequest", "cancelRequest", "deleteRequest",
                                      "redeliverWebhook")}
EXAMPLE_CSV = ("S. No.,Product Name,Input Image Urls\n"
               "1,Shoe,\"https://images.example.com/shoe-1.jpg,https://images.example.com/shoe-2.jpg\"\n")
NOT_FOUND = error("`unknown_request`: no request with this id (or it was deleted)")
FILLED = {"type": "string", "minLength": 1}
NOTIFICATION = {"anyOf": [
    {**obj({"type": {"const": "request.completed"}, "data": obj({"request_id": FILLED, "status": FILLED})}),
     "title": "imgpipe's own request.completed message"},
    {**obj({"image_id": FILLED, "status": FILLED, "output_images": {"type": "array"}}),
     "not": obj({"type": {"const": "request.completed"}}), "title": "the classic notification"},
]}
FLAG = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}
COLUMNS = query("columns", STRING, "columns to add after `Output Image Urls`, comma-separated: `ssim`, `quality`")
COLUMNS_REFUSED = error("`invalid_parameter`: `columns` names an unknown column or one twice")

PATHS: dict[str, dict[str, Schema]] = {
    "/upload": {"post": operation(
        "upload", "Upload a CSV of products and their image URLs; answered once the request shows in GET /status",
        {200: answer("the same `Idempotency-Key` and body as an earlier upload: that request again, nothing new",
                     ref("Accepted"), headers={"Idempotent-Replayed": {"const": "true"}}),
         202: {**answer("accepted: the request is queued", ref("Accepted")), "links": REQUEST_LINKS},
         400: answer("`invalid_csv` (with `problems`: every line, column and reason), `missing_file`, "
                     "`invalid_multipart`, `invalid_webhook_url`, `invalid_idempotency_key`, `invalid_body`",
                     {"anyOf": [ref("InvalidCsv"), ref("Error")]}),
         409: error("`request_deleted`: the `Idempotency-Key` belongs to a request since deleted"),
         413: error("`too_large`: the CSV is over `limits.max_upload_bytes`, or a form field over 8 KB"),
         415: error("`unsupported_media_type`: neither multipart/form-data nor text/csv"),
         422: error("`idempotency_key_reused`: the `Idempotency-Key` was used with another body")},
        parameters=[
            query("webhook_url", STRING, "a listener for this request's completion (also as a form field)"),
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": STRING,
             "description": "at most 255 printable characters; the same key and body give the same request"},
        ],
        body={"required": True, "content": {
            "multipart/form-data": {"schema": obj({"file": {"type": "string", "contentMediaType": CSV}},
                                                  {"webhook_url": STRING})},
            CSV: {"schema": STRING, "example": EXAMPLE_CSV},
        }})},
    "/status/{request_id}": {"get": operation(
        "getStatus", "A request's status, progress, images and webhook deliveries",
        {200: answer("the request", ref("Status")),
         400: error("`invalid_parameter`: `products`, `offset` or `limit` is not a valid value (named in `field`)"),
         404: NOT_FOUND},
        parameters=[REQUEST_ID,
                    query("products", FLAG, "false: leave out `products` (for polling a large request)"),
                    query("offset", {"type": "integer", "minimum": 0, "maximum": 10**9},
                          "the first product of a page (0-based, in input order)"),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "products in a page")])},
    "/export": {"get": operation(
        "exportAll", "The output CSV of every finished request",
        {200: answer("the CSV, as an attachment", STRING, CSV), 400: COLUMNS_REFUSED}, parameters=[COLUMNS])},
    "/export/{request_id}": {"get": operation(
        "exportRequest", "The output CSV of one finished request",
        {200: answer("the CSV, as an attachment", STRING, CSV), 400: COLUMNS_REFUSED, 404: NOT_FOUND,
         409: error("`not_finished`: the request still runs (with `status` and `progress`)", "NotFinished")},
        parameters=[REQUEST_ID, COLUMNS])},
    "/images/{name}": {"get": operation(
        "getImage", "A compressed image",
        {200: answer("the image", {"type": "string", "contentMediaType": "image/*"}, "image/*"),
         302: answer("with `storage.public_url`: the image's URL there", headers={"Location": STRING}),
         404: error("`unknown_image`"),
         503: answer("`image_store_unavailable` (or a full disk, an unreachable database)", ref("Error"),
                     headers={"Retry-After": INTEGER})},
        parameters=[{"name": "name", "in": "path", "required": True, "schema": STRING}])},
    "/retry/{request_id}": {"post": operation(
        "retryRequest", "Try a finished request's failed images again, as a new round",
        {202: answer("the new round has started", obj({"request_id": STRING, "status": {"const": "processing"},
                                                       "round": INTEGER, "images": INTEGER, "status_url": STRING})),
         404: NOT_FOUND, 409: error("`not_finished`, `nothing_failed` or `cancelled`")},
        parameters=[REQUEST_ID])},
    "/cancel/{request_id}": {"post": operation(
        "cancelRequest", "Stop a running request; what is compressed stays",
        {200: answer("the request is cancelled", obj({"request_id": STRING, "status": {"const": "cancelled"},
                                                      "progress": ref("Progress"), "status_url": STRING})),
         404: NOT_FOUND, 409: error("`already_finished`")},
        parameters=[REQUEST_ID])},
    "/requests/{request_id}": {"delete": operation(
        "deleteRequest", "Remove a finished request: its images, outbox file, archived CSV and status",
        {200: answer("removed", obj({"request_id": STRING, "deleted": {"const": True}})),
         404: NOT_FOUND, 409: error("`not_finished`")},
        parameters=[REQUEST_ID])},
    "/redeliver/{request_id}": {"post": operation(
        "redeliverWebhook", "Send a completed request's webhook again, under the same webhook-id",
        {202: answer("queued", obj({"request_id": STRING, "message_id": STRING, "status": {"const": "queued"}})),
         404: NOT_FOUND, 409: error("`not_finished`, or `no_listener`: nobody to send it to")},
        parameters=[REQUEST_ID])},
    "/webhook": {"post": operation(
        "receiveNotification", "Record an inbound completion notification on its request",
        {202: answer("recorded (or a duplicate `webhook-id`, acknowledged)", obj(
            {"request_id": STRING, "recorded": BOOLEAN, "duplicate": BOOLEAN, "verified": BOOLEAN})),
         400: error("`invalid_notification` (naming the `field`), `invalid_body`"),
         401: error("`unauthorized`, or `invalid_signature` with `webhooks.inbound_secret`"),
         404: NOT_FOUND, 413: error("`too_large`: over `webhooks.max_inbound_bytes`"),
         415: error("`unsupported_media_type`: not application/json")},
        parameters=[{"name": header, "in": "header", "required": False, "schema": STRING}
                    for header in ("webhook-id", "webhook-timestamp", "webhook-signature")],
        body={"required": True, "content": {JSON: {"schema": NOTIFICATION}}})},
    "/requests": {"get": operation(
        "listRequests", "The newest requests first, a page at a time, with their progress and sizes",
        {200: answer("one page; `next` is the cursor of the next (null after the last)", ref("RequestList")),
         400: error("`invalid_parameter`: `limit`, `status` or `before` is not a valid value (named in `field`)")},
        parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "requests in a page (20)"),
                    query("status", {"enum": REQUEST_STATES}, "only requests in this status"),
                    query("before", STRING, "the `next` cursor of the previous page")])},
    "/events": {"get": operation(
        "requestEvents", "Server-sent events: a request's summary (`event: request`, as in GET /requests) whenever "
        "it changes, `event: deleted` when it is gone; the stream does not end by itself",
        {200: answer("the event stream", STRING, "text/event-stream")}, database=False)},
    "/requests/{request_id}/images/{product}/{index}/original": {"get": operation(
        "getOriginal", "An image before compression, fetched from its origin now under the download rules",
        {200: answer("the image as the origin serves it", {"type": "string", "contentMediaType": "image/*"},
                     "image/*"),
         403: error("`original_refused`: its address is one downloads refuse (`[network]`)"),
         404: error("`unknown_image`: no such request, product or image"),
         502: error("`original_unavailable`: the origin failed or timed out, or the image is over "
                    "`download.max_bytes`")},
        parameters=[REQUEST_ID, *({"name": name, "in": "path", "required": True,
                                   "schema": {"type": "integer", "minimum": 0}, "description": f"the {name}, "
                                   "0-based, as in GET /status"} for name in ("product", "index"))])},
    "/": {"get": operation(
        "page", "The page: upload, requests with live progress, a request's images, before/after",
        {200: answer("the page", STRING, "text/html")}, token=False, database=False)},
    "/ui/page.js": {"get": operation(
        "pageScript", "The page's script", {200: answer("JavaScript", STRING, "text/javascript")},
        token=False, database=False)},
    "/ui/page.css": {"get": operation(
        "pageStyle", "The page's style sheet", {200: answer("CSS", STRING, "text/css")}, token=False, database=False)},
    "/healthz": {"get": operation(
        "health", "Whether the daemon runs, and what its work waits for",
        {200: answer("`ok`, or `degraded` with reasons", ref("Health"))}, token=False, database=False)},
    "/metrics": {"get": operation(
        "metrics", "Prometheus metrics (text format 0.0.4); names in docs/operations.md",
        {200: answer("the metrics", STRING, "text/plain")})},
    "/openapi.json": {"get": operation(
        "openapi", "This description", {200: answer("OpenAPI 3.1", {"type": "object"})}, database=False)},
}

# What the browser guard (daemon/web/guard.py) answers before any handler: a Host not the daemon's own (every path
# but /healthz), a write from another site.
MISDIRECTED = error("`unknown_host`: the `Host` header names another site (DNS rebinding)")
CROSS_SITE = error("`cross_site_request`: `Origin` or `Sec-Fetch-Site` says another website sent it")
for _path, _operations in PATHS.items():
    for _method, _operation in _operations.items():
        _guarded = {**({"421": MISDIRECTED} if _path != "/healthz" else {}),
                    **({"403": CROSS_SITE} if _method in ("post", "put", "patch", "delete") else {})}
        _operation["responses"] = dict(sorted({**_guarded, **_operation["responses"]}.items()))

DESCRIPTION: Schema = {
    "openapi": "3.1.0",
    "info": {"title": "imgpipe", "version": "0.1.0", "description": (
        "Downloads, compresses and stores the product images a CSV lists. Every error is JSON "
        "`{\"error\", \"message\", ...}`. Every GET also answers HEAD. docs/api.md has every detail.")},
    "components": {"schemas": SCHEMAS, "securitySchemes": {"token": {
        "type": "http", "scheme": "bearer", "description": "needed on every endpoint but /healthz when "
        "`server.tokens` is set"}}},
    "security": [{"token": []}],
    "paths": PATHS,
}
ENCODED = json.dumps(DESCRIPTION, ensure_ascii=False, indent=1).encode("utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=ENCODED, content_type=JSON, charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
