"""`farm serve`: the farm's REST API (`/v1`), one ASGI app on the same Redis and store as
the rest of the farm. Submission goes through `dispatcher.submit` exactly as `farm submit`
does; every job id answers with an explicit state, or 404.

A request names who it is with `Authorization: Bearer <token>` (`farm token create`), or
HTTP Basic `user:token`. A user sees and controls only their own jobs; another user's job
answers 404, as an unknown one does. `auth=False` (`farm serve --no-auth`) is for one
trusted host: every request is an admin acting as the login user.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, get_args

from fastapi import (
    APIRouter,
    Body,
    Cookie,
    Depends,
    FastAPI,
    HTTPException,
    Query,
    Request,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dispatcher import control, webui
from dispatcher.dashboard import COOKIE, dashboard_routes
from dispatcher.submit import Submitted, default_user, submit
from farm import __version__, infotext, keys, png, pool, samplers
from farm.errors import BrokerUnavailable, JobNotFound, SpecError, StoreUnavailable
from farm.connections import connect
from farm.jobs import JobBoard, JobHeader, JobState, JobStateError
from farm.settings import Settings
from farm.spec import (
    BUILTIN_MODELS,
    STORE_PREFIX,
    HiresUpscaler,
    JobSpec,
    decode_spec,
    parse_spec,
)
from farm.store import KeyMissing, Store, open_store
from farm.tokens import Caller, TokenBook

#: Spec fields that name files on the server's disk: a client may not point them anywhere.
_LOCAL_ONLY = ("prompts_file",)
_MODEL_NAME = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._ /-]{0,199}")
_DATA_URL = re.compile(r"data:[\w/+.-]+;base64,", re.I)
#: Seconds between two looks at the caller's jobs for /v1/events.
EVENTS_INTERVAL = 1.0
#: Seconds between two looks at a webui call's job while the call waits for it.
WEBUI_POLL = 0.2


def create_app(settings: Settings, *, auth: bool = True) -> FastAPI:
    board = JobBoard(connect(settings))
    store = open_store(settings.require_store(), settings)
    tokens = TokenBook(board.redis)
    app = FastAPI(title="farm", version=__version__,
                  description="A render farm for Stable Diffusion: jobs, their images, the worker pool.")
    _add_error_handlers(app)
    _add_body_limit(app, settings.api_max_body)
    caller = _authenticator(tokens, auth)
    app.include_router(_routes(settings, board, store, caller))
    app.include_router(_webui_routes(settings, board, store, caller))
    app.include_router(dashboard_routes())
    _add_metrics(app, board)
    return app


def _add_metrics(app: FastAPI, board: JobBoard) -> None:
    """Prometheus' scrape: the pool's figures and this process's own, without a token (as
    exporters are scraped); they name users and models, never prompts or images."""
    from fastapi.responses import Response

    from farm import metrics

    if metrics.prom is None:
        return
    pool_registry = metrics.pool_registry(board.redis)

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        body = metrics.prom.generate_latest(pool_registry) + metrics.prom.generate_latest()
        return Response(body, media_type=metrics.prom.CONTENT_TYPE_LATEST)


# --- who is asking ------------------------------------------------------------------------

def _authenticator(tokens: TokenBook, auth: bool):
    trusted = Caller(default_user(), admin=True)

    def caller(bearer: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False)),
               basic: HTTPBasicCredentials | None = Depends(HTTPBasic(auto_error=False)),
               cookie: str | None = Cookie(None, alias=COOKIE, include_in_schema=False)) -> Caller:
        if not auth:
            return trusted
        found = None
        if bearer is not None:
            found = tokens.caller(bearer.credentials)
        elif cookie:
            found = tokens.caller(cookie)
        elif basic is not None:
            # user:token, as the webui's --api-auth takes user:password; the user must be the token's.
            found = tokens.caller(basic.password)
            found = found if found is not None and found.user == basic.username else None
        if found is None:
            raise HTTPException(401, "a valid token is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": 'Bearer realm="farm"'})
        return found

    return caller


# --- errors: one shape, the field named ---------------------------------------------------

class Detail(BaseModel):
    detail: str


class Problem(BaseModel):
    loc: list[str | int]
    field: str
    msg: str
    type: str


class Problems(BaseModel):
    detail: list[Problem]


class JobChange(BaseModel):
    """What PATCH may change: only the priority."""

    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=-100, le=100)

    @field_validator("priority", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # JSON's integers: 10 and 10.0, never true or "10".
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"must be an integer from -100 to 100, got {value!r}")
        return int(value)


class WebuiOptions(BaseModel):
    """The webui options the farm keeps, per user: only sd_model_checkpoint."""

    model_config = ConfigDict(extra="forbid")
    sd_model_checkpoint: str | None = None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str


_MEANINGS = {
    400: "The body could not be parsed at all", 401: "No token, a wrong one or a revoked one",
    404: "No such job, or another user's",
    409: "The job's state does not allow it", 413: "The request body is over the limit",
    422: "What is wrong, each problem with its field", 429: "The caller's waiting items would pass the limit",
    501: "Not offered by the farm", 503: "Redis or the store cannot be reached (retry after a while)",
}


def responses(*codes: int) -> dict[int, dict]:
    """The error answers an operation may give, for its OpenAPI description."""
    return {code: {"model": Problems if code == 422 else Detail, "description": _MEANINGS[code]} for code in codes}


def _job_body_schema() -> dict:
    """JobSpec's JSON schema with its definitions inlined (OpenAPI keeps no $defs of its own)."""
    schema = JobSpec.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def _problems(e: SpecError) -> list[dict]:
    return [{"loc": ["body", *field.split(".")], "field": field, "msg": reason, "type": "spec"}
            for field, reason in e.problems]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecError)
    async def spec_error(_request, e: SpecError):
        return JSONResponse({"detail": _problems(e)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_error(_request, e: RequestValidationError):
        # FastAPI's own (query and path parameters, typed bodies), in the same shape, the field named.
        return JSONResponse({"detail": [
            {"loc": list(error["loc"]), "field": ".".join(str(part) for part in error["loc"][1:]) or error["loc"][0],
             "msg": error["msg"], "type": error["type"]} for error in e.errors()]}, status_code=422)

    @app.exception_handler(JobNotFound)
    async def not_found(_request, e: JobNotFound):
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(JobStateError)
    async def conflict(_request, e: JobStateError):
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(BrokerUnavailable)
    @app.exception_handler(StoreUnavailable)
    async def unavailable(_request, e: Exception):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413: at once when its Content-Length says
    so, and, for a chunked body, as soon as the bytes read pass the limit (never read whole)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, send) -> None:
        await JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)(
            {"type": "http"}, None, send)


def _add_body_limit(app: FastAPI, limit: int) -> None:
    app.add_middleware(BodyLimit, limit=limit)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request, _e):
        return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)


# --- the job spec over HTTP ---------------------------------------------------------------

def spec_from_request(data: Any, settings: Settings, folder: Path):
    """A JobSpec from a request body. Validated as `farm submit` validates a file, with what a
    remote client may not do refused: naming files on the server (prompts_file, local image
    paths and LoRA files, model paths outside the operator's model folder). Init images and masks come as
    base64 (or a data: URL), written to `folder` for the submission to upload, or as store: keys."""
    if not isinstance(data, dict):
        raise SpecError.single("spec", f"must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    problems: list[tuple[str, str]] = []
    for field in _LOCAL_ONLY:
        if field in data:
            problems.append((field, "names a file on the server; send the values themselves"))
    for field in ("model", "vae"):
        _check_model_name(data.get(field), field, settings, problems)
    for field in ("init_image", "mask"):
        value = data.get(field)
        if isinstance(value, list):
            data[field] = [_image_ref(v, f"{field}[{i}]", folder, problems) for i, v in enumerate(value)]
        elif value is not None:
            data[field] = _image_ref(value, field, folder, problems)
    export = data.get("export")
    if isinstance(export, dict) and isinstance(export.get("dest"), str) and not export["dest"].startswith("s3://"):
        problems.append(("export.dest", "names a folder on the server; give s3://bucket/prefix"))
    if isinstance(data.get("loras"), dict):
        for name, ref in data["loras"].items():
            if isinstance(ref, str) and not ref.startswith(STORE_PREFIX):
                problems.append((f"loras.{name}", "names a file on the server; give a store: key"))
    if problems:
        raise SpecError(problems)
    return parse_spec(data, base_dir=settings.model_dir or folder, allow_pickle=settings.allow_pickle)


def _check_model_name(value: Any, field: str, settings: Settings, problems: list) -> None:
    if not isinstance(value, str) or (field == "model" and value in BUILTIN_MODELS):
        return  # absent, or not a string: the spec's own validation names the problem
    if settings.model_dir is None:
        problems.append((field, f"this server offers only the built-in models ({', '.join(BUILTIN_MODELS)}); "
                                "the operator sets FARM_MODEL_DIR for more"))
    elif not _MODEL_NAME.fullmatch(value) or ".." in Path(value).parts or value.startswith("/"):
        problems.append((field, "must name a model below the server's model folder (no absolute paths, no ..)"))


def _image_ref(value: Any, field: str, folder: Path, problems: list) -> Any:
    if not isinstance(value, str) or value.startswith(STORE_PREFIX):
        return value
    try:
        data = base64.b64decode(_DATA_URL.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError):
        problems.append((field, "must be base64 image data (or a data: URL) or a store: key"))
        return value
    path = folder / f"{field.replace('[', '-').rstrip(']')}.img"
    path.write_bytes(data)
    return str(path)


# --- the routes -----------------------------------------------------------------------------

def _submit(settings: Settings, board: JobBoard, store: Store, who: Caller, spec: JobSpec) -> Submitted:
    """Submit for the caller, within their share of waiting work (429 past it)."""
    waiting = board.waiting_items(who.user)
    if waiting + spec.item_count > settings.api_max_queued:
        raise HTTPException(429, f"{who.user} has {waiting} items waiting; this job's {spec.item_count} "
                                 f"would pass the limit of {settings.api_max_queued}")
    return submit(spec, settings, user=who.user, store=store)


def _routes(settings: Settings, board: JobBoard, store: Store, caller):
    router = APIRouter(prefix="/v1", responses=responses(401, 413, 503))
    job_errors, control_errors = responses(404), responses(404, 409)

    def visible(job_id: str, who: Caller) -> JobHeader:
        """The job's header if the caller may see it; JobNotFound (404) otherwise, unknown or not."""
        try:
            keys.check_job_id(job_id)
        except ValueError:
            raise JobNotFound(f"no job {job_id!r}") from None
        header = board.header(job_id)
        if not who.may_see(header.user):
            raise JobNotFound(f"no job {job_id!r} in Redis")
        return header

    @router.post("/jobs", status_code=201, summary="Submit a job: JSON with the TOML's fields, or the TOML itself "
                                                   "(Content-Type: application/toml)",
                 responses=responses(400, 422, 429), openapi_extra={"requestBody": {"content": {
                     "application/json": {"schema": _job_body_schema(),
                                          "example": {"prompts": ["a red circle"], "seeds": [1, 2]}},
                     "application/toml": {"schema": {"type": "string"}}}, "required": True}})
    async def create_job(request: Request, who: Caller = Depends(caller)) -> dict:
        raw = await request.body()
        toml = request.headers.get("content-type", "").split(";")[0].strip() in ("application/toml", "text/plain")
        return await run_in_threadpool(_create_job, decode_spec(raw, json_format=not toml), who)

    def _create_job(spec: Any, who: Caller) -> dict:
        with tempfile.TemporaryDirectory(prefix="farm-api-") as folder:
            submitted = _submit(settings, board, store, who, spec_from_request(spec, settings, Path(folder)))
        return {"id": submitted.job_id, "items": submitted.items, "chunks": submitted.chunks,
                "state": JobState.QUEUED.value}

    @router.get("/jobs", summary="The caller's jobs, newest first (an admin's: everyone's)")
    def list_jobs(state: JobState | None = None, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
                  who: Caller = Depends(caller)) -> dict:
        headers = board.listing(None if who.admin else who.user, offset=offset, limit=limit, state=state)
        return {"jobs": [board.status(h.job_id).summary() for h in headers], "offset": offset, "limit": limit}

    @router.get("/jobs/{job_id}", summary="A job's state, counts, queue position, ETA and failed items",
                responses=job_errors)
    def get_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        header = visible(job_id, who)
        return {**board.status(job_id).summary(), "queue_position": board.queue_position(header)}

    @router.patch("/jobs/{job_id}", summary="Change a job's priority (-100..100)", responses=responses(400, 404, 422))
    def patch_job(job_id: str, change: JobChange = Body(..., examples=[{"priority": 10}]),
                  who: Caller = Depends(caller)) -> dict:
        visible(job_id, who)
        control.set_priority(board, job_id, change.priority)
        return board.status(job_id).summary()

    @router.post("/jobs/{job_id}/cancel", summary="Stop a job for good; what is stored stays", responses=control_errors)
    def cancel_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        visible(job_id, who)
        control.cancel(board, store, job_id)
        return board.status(job_id).summary()

    @router.post("/jobs/{job_id}/pause", summary="Hold a job: running chunks finish, no new ones start",
                 responses=control_errors)
    def pause_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        visible(job_id, who)
        control.pause(board, job_id)
        return board.status(job_id).summary()

    @router.post("/jobs/{job_id}/resume", summary="Resume a paused job", responses=control_errors)
    def resume_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        header = visible(job_id, who)
        if header.state is not JobState.PAUSED:
            raise JobStateError(f"job {job_id} is {header.state.value}; only a paused job resumes")
        control.resume(board, store, job_id)
        return board.status(job_id).summary()

    @router.get("/jobs/{job_id}/items", summary="The job's items: done ones with their records and image URLs",
                responses=job_errors)
    def job_items(job_id: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
                  who: Caller = Depends(caller)) -> dict:
        header = visible(job_id, who)
        indexes = list(range(offset, min(header.total, offset + limit)))
        done = board.done_among(job_id, indexes)
        failures = board.status(job_id).failures
        rows = []
        for index in indexes:
            row: dict[str, Any] = {"index": index, "state": "pending"}
            if index in done:
                record = _record(store, job_id, index)
                row = {**row, "state": "done", "image_url": f"/v1/jobs/{job_id}/images/{index}", "record": record}
            elif index in failures:
                row = {**row, "state": "failed", "reason": failures[index]}
            rows.append(row)
        return {"items": rows, "offset": offset, "limit": limit, "total": header.total}

    def item_record(job_id: str, index: int, who: Caller) -> dict | None:
        """The item's record once it is stored; 404 for an index the job does not have."""
        header = visible(job_id, who)
        if not 0 <= index < header.total:
            raise HTTPException(404, f"job {job_id} has items 0..{header.total - 1}")
        return _record(store, job_id, index)

    @router.get("/jobs/{job_id}/items/{index}", summary="One item: its state, record and `parameters` infotext",
                responses=job_errors)
    def job_item(job_id: str, index: int, who: Caller = Depends(caller)) -> dict:
        record = item_record(job_id, index, who)
        if record is None:
            reason = board.status(job_id).failures.get(index)
            return {"index": index, "state": "failed" if reason else "pending", "reason": reason}
        return {"index": index, "state": "done", "image_url": f"/v1/jobs/{job_id}/images/{index}", "record": record,
                "parameters": png.read_parameters(store.get(record["key"]))}

    @router.get("/jobs/{job_id}/manifest", summary="The finished job's manifest (JSON lines, one record an image)",
                response_class=Response,
                responses={200: {"content": {"application/jsonl": {}}}, **control_errors})
    def job_manifest(job_id: str, who: Caller = Depends(caller)) -> Response:
        visible(job_id, who)
        try:
            data = store.get(keys.manifest(job_id))
        except KeyMissing:
            raise HTTPException(404, f"job {job_id} has no manifest yet (it is written when the job ends)") from None
        return Response(data, media_type="application/jsonl")

    @router.get("/jobs/{job_id}/images/{index}", summary="One stored image (PNG, with its parameters)",
                response_class=Response, responses={200: {"content": {"image/png": {}}}, **job_errors})
    def job_image(job_id: str, index: int, who: Caller = Depends(caller)) -> Response:
        record = item_record(job_id, index, who)
        if record is None:
            raise HTTPException(404, f"item {index} of job {job_id} is not stored (yet)")
        return Response(store.get(record["key"]), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/events", summary="Server-sent events: the caller's jobs as they change (event: job)",
                response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request, who: Caller = Depends(caller)) -> StreamingResponse:
        changes = JobChanges(board, None if who.admin else who.user)

        async def stream():
            yield ": farm job events\n\n"
            while not await request.is_disconnected():
                for summary in await run_in_threadpool(changes.poll):
                    yield f"event: job\nid: {summary['job']}\ndata: {json.dumps(summary)}\n\n"
                await asyncio.sleep(EVENTS_INTERVAL)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @router.get("/workers", summary="The pool's workers: host, GPU, models held, current chunk, pace")
    def workers(_who: Caller = Depends(caller)) -> dict:
        now = time.time()
        views = pool.read(board.redis, settings.queue)
        return {"workers": [w.summary(now) for w in views], "model_loads": sum(w.loads for w in views)}

    return router


# --- the webui's API ------------------------------------------------------------------------

def _webui_routes(settings: Settings, board: JobBoard, store: Store, caller):
    router = APIRouter(prefix="/sdapi/v1", tags=["webui"], responses=responses(401, 413, 503))

    def model_of(who: Caller) -> str:
        chosen = board.redis.hget(keys.webui_options(who.user), "sd_model_checkpoint")
        return chosen.decode() if chosen else JobSpec.model_fields["model"].default

    def start(body: Any, mode: str, who: Caller) -> tuple[dict, str]:
        try:
            fields = webui.request_fields(body, mode)
            with tempfile.TemporaryDirectory(prefix="farm-webui-") as folder:
                spec = spec_from_request(webui.job_spec(fields, mode, model=model_of(who)), settings, Path(folder))
                submitted = _submit(settings, board, store, who, spec)
        except SpecError as e:
            raise webui.webui_problems(e) from None
        board.redis.set(keys.webui_current(who.user), submitted.job_id, ex=keys.FINISHED_JOB_TTL)
        return fields, submitted.job_id

    async def render(body: Any, mode: str, who: Caller) -> dict:
        fields, job_id = await run_in_threadpool(start, body, mode, who)
        # Waited for here, not in a thread: a burst of calls must not use up the thread pool.
        while (state := await run_in_threadpool(board.state, job_id)) is not None and not state.finished:
            await asyncio.sleep(WEBUI_POLL)
        return await run_in_threadpool(collect, fields, job_id)

    def collect(fields: dict, job_id: str) -> dict:
        status = board.status(job_id)
        pictures = [store.get(r["key"]) for i in range(status.total) if (r := _record(store, job_id, i)) is not None]
        if not pictures and status.failures:
            return JSONResponse({"error": "RenderError", "detail": status.failures[min(status.failures)],
                                 "errors": {str(k): v for k, v in status.failures.items()}}, status_code=500)
        return webui.answer(fields, pictures, job_id=job_id)

    @router.post("/txt2img", summary="The webui's txt2img, spread over the pool", responses=responses(400, 422, 429))
    async def txt2img(body: dict[str, Any] = Body(...), who: Caller = Depends(caller)) -> dict:
        return await render(body, "txt2img", who)

    @router.post("/img2img", summary="The webui's img2img and inpaint, spread over the pool",
                 responses=responses(400, 422, 429))
    async def img2img(body: dict[str, Any] = Body(...), who: Caller = Depends(caller)) -> dict:
        return await render(body, "img2img", who)

    def current(who: Caller) -> str | None:
        job_id = board.redis.get(keys.webui_current(who.user))
        return job_id.decode() if job_id and board.exists(job_id.decode()) else None

    @router.get("/progress", summary="Progress of the caller's last txt2img/img2img call")
    def progress(who: Caller = Depends(caller)) -> dict:
        job_id = current(who)
        idle = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job_id is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
        s = board.status(job_id).summary()
        live = not JobState(s["state"]).finished
        return {"progress": s["progress"] if live else 0.0, "eta_relative": s["eta_seconds"] or 0.0,
                "state": {**idle, "interrupted": s["state"] == JobState.CANCELLED.value, "job": job_id if live else "",
                          "job_count": s["total"] if live else 0, "job_no": s["done"] + s["failed"]},
                "current_image": None, "textinfo": None}

    @router.post("/interrupt", summary="Stop the caller's running txt2img/img2img; what is stored is answered")
    def interrupt(who: Caller = Depends(caller)) -> dict:
        job_id = current(who)
        if job_id and not board.status(job_id).finished:
            control.cancel(board, store, job_id)
        return {}

    @router.post("/skip", summary="Not offered: the farm renders a call's batches at once, on many workers",
                 responses=responses(501))
    def skip(_who: Caller = Depends(caller)) -> Response:
        return JSONResponse({"detail": "skip is not offered: a call's batches render at once on the pool; "
                                       "use /sdapi/v1/interrupt"}, status_code=501)

    @router.get("/samplers")
    def samplers_list(_who: Caller = Depends(caller)) -> list[dict]:
        return [{"name": name, "aliases": [], "options": {}} for name in samplers.SAMPLERS]

    @router.get("/schedulers")
    def schedulers(_who: Caller = Depends(caller)) -> list[dict]:
        return [{"name": s.value.lower(), "label": s.value, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for s in samplers.ScheduleType]

    @router.get("/sd-models")
    def sd_models(_who: Caller = Depends(caller)) -> list[dict]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in _model_names(settings)]

    @router.get("/scripts", summary="The webui's scripts: the farm runs none (script_name is refused)")
    def scripts(_who: Caller = Depends(caller)) -> dict:
        return {"txt2img": [], "img2img": []}

    @router.get("/sd-vae")
    def sd_vae(_who: Caller = Depends(caller)) -> list[dict]:
        return []

    @router.get("/upscalers")
    def upscalers(_who: Caller = Depends(caller)) -> list[dict]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for name in get_args(HiresUpscaler)]

    @router.get("/options")
    def get_options(who: Caller = Depends(caller)) -> dict:
        return {"sd_model_checkpoint": model_of(who), "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @router.post("/options", summary="Set the caller's sd_model_checkpoint (the only option the farm keeps)",
                 responses=responses(400, 422))
    def set_options(body: WebuiOptions, who: Caller = Depends(caller)) -> dict:
        model = body.sd_model_checkpoint
        if model is not None:
            if model not in _model_names(settings):
                raise SpecError.single("sd_model_checkpoint", f"no model {model!r}; see /sdapi/v1/sd-models")
            board.redis.hset(keys.webui_options(who.user), "sd_model_checkpoint", model)
        return {}

    @router.post("/png-info", summary="An image's generation parameters, parsed as the webui's PNG Info does",
                 responses=responses(400, 422))
    def png_info(body: PngInfoRequest, _who: Caller = Depends(caller)) -> dict:
        try:
            data = base64.b64decode(_DATA_URL.sub("", body.image, count=1), validate=True)
            text = png.read_parameters(data)
        except (binascii.Error, ValueError, OSError):
            raise SpecError.single("image", "must be a base64 PNG") from None
        if text is None:
            return {"info": "", "items": {}, "parameters": {}}
        return {"info": text, "items": {"parameters": text}, "parameters": infotext.parse(text)}

    return router


def _model_names(settings: Settings) -> list[str]:
    """The built-ins, then the checkpoints and diffusers folders in the operator's model folder."""
    names = list(BUILTIN_MODELS)
    folder = settings.model_dir
    if folder and folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix == ".safetensors" or (path / "model_index.json").exists():
                names.append(path.name)
    return names


class JobChanges:
    """What changed in a user's jobs since the last poll: every unfinished job at the first poll,
    then each job whose state or counts moved (a job that ends is sent once more, finished)."""

    #: The newest jobs looked at each poll.
    WINDOW = 100

    def __init__(self, board: JobBoard, user: str | None):
        self.board, self.user = board, user
        self.seen: dict[str, tuple] | None = None

    def poll(self) -> list[dict]:
        first, seen = self.seen is None, self.seen or {}
        changed = []
        for header in self.board.listing(self.user, limit=self.WINDOW):
            if seen.get(header.job_id) == _ENDED or (first and header.finished):
                seen[header.job_id] = _ENDED  # sent once when it ended, or history when we came
                continue
            summary = self.board.status(header.job_id).summary()
            ended = JobState(summary["state"]).finished
            mark = _ENDED if ended else tuple(summary[k] for k in ("state", "done", "failed", "progress"))
            if seen.get(header.job_id) != mark:
                changed.append(summary)
            seen[header.job_id] = mark
        self.seen = seen
        return changed


_ENDED = ("ended",)


def _record(store: Store, job_id: str, index: int) -> dict | None:
    try:
        return json.loads(store.get(keys.record(job_id, index)))
    except KeyMissing:
        return None



class BackgroundServer:
    """The app served on a thread of this process, for `farm run --serve`."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="farm-serve", daemon=True)

    def start(self, timeout: float = 30) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the dashboard could not listen on {self.server.config.host}:{self.server.config.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
