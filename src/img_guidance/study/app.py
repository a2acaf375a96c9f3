"""The rating web app of ``img-guidance study serve``: FastAPI, Jinja2 templates, and the JSON API the
page is built on (scripts can use it too; its OpenAPI schema is at ``/api/openapi.json``).

    GET  /api/next?rater=NAME   the rater's next pair: {"pair", "left", "right", "prompt", "question",
                                "done", "total"}; "pair" is null once every pair has a vote
    POST /api/vote              {"rater", "pair", "choice": "left" | "right" | "tie"}: committed before
                                the answer {"pair", "choice", "done", "total"}
    POST /api/undo              {"rater"}: removes the rater's last vote -> {"undone", "done", "total"}
    GET  /api/study             {"question", "total", "invites_required"}
    GET  /images/NAME           a study image, looked up by name in the database

Bad input is a 4xx with ``{"detail": "one line naming the bad value"}`` and changes nothing: 422 for
a malformed request or value, 404 for a pair or rater the study does not know, 403 for a name that is
not an invite code where the study requires one.
"""

import sqlite3
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from img_guidance.study.store import (
    NotInvited,
    StudyError,
    StudyStore,
    UnknownPair,
    UnknownRater,
    check_rater,
)

TEMPLATES = Path(__file__).parent / "templates"
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


class VoteRequest(BaseModel):
    """A rater's answer on one of their pairs (the ``pair`` id that ``/api/next`` gave them)."""

    model_config = ConfigDict(extra="forbid")
    rater: StrictStr
    pair: StrictInt
    choice: Literal["left", "right", "tie"]


class UndoRequest(BaseModel):
    """Remove the rater's most recent vote."""

    model_config = ConfigDict(extra="forbid")
    rater: StrictStr


class NextPair(BaseModel):
    pair: int | None
    left: str | None
    right: str | None
    prompt: str | None
    question: str
    done: int
    total: int


class VoteResult(BaseModel):
    pair: int
    choice: str
    done: int
    total: int


class UndoResult(BaseModel):
    undone: int | None
    done: int
    total: int


class StudyInfo(BaseModel):
    question: str
    total: int
    invites_required: bool


def _one_line(err: RequestValidationError) -> str:
    """A validation error as one line: where, what, and the value given."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"] if x not in ("body", "query"))
        given = f" (got {e['input']!r})" if e.get("type") != "missing" and "input" in e else ""
        parts.append(f"{where or 'body'}: {e['msg']}{given}")
    return "; ".join(parts)


def _status(err: StudyError) -> int:
    if isinstance(err, NotInvited):
        return 403
    if isinstance(err, (UnknownPair, UnknownRater)):
        return 404
    return 422


def create_app(store: StudyStore) -> FastAPI:
    """The app over one study; with ``store.invites_only`` every rater must give an invite code."""
    app = FastAPI(
        title="img-guidance study",
        summary="An A/B preference study: one pair at a time, left / right / tie.",
        docs_url=None,  # the interactive docs load scripts from a CDN; the schema is enough offline
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    templates = Jinja2Templates(directory=TEMPLATES)

    def image_url(name: str | None) -> str | None:
        return None if name is None else f"/images/{name}"

    @app.exception_handler(StudyError)
    def study_error(request: Request, err: StudyError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=_status(err))

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(err)}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    def database_error(request: Request, err: sqlite3.OperationalError) -> JSONResponse:
        # locked past the 30 s busy timeout, or a disk error: nothing was written
        return JSONResponse({"detail": f"the study database failed ({err}); try again"}, status_code=503)

    def login_page(request: Request, error: str | None = None, status: int = 200):
        context = {"invites_required": store.invites_only, "error": error, "total": store.trials_per_rater}
        return templates.TemplateResponse(request, "login.html", context, status_code=status)

    @app.get("/", include_in_schema=False)
    def login(request: Request):
        return login_page(request)

    @app.get("/rate", include_in_schema=False)
    def rate(request: Request, rater: str | None = None):
        if rater is None or not rater.strip():
            return RedirectResponse("/", status_code=303)
        try:
            name = check_rater(rater)
            store.check_invited(name)
        except StudyError as err:
            return login_page(request, error=str(err), status=_status(err))
        context = {"rater": name, "question": store.question, "total": store.trials_per_rater}
        return templates.TemplateResponse(request, "rate.html", context)

    @app.get("/api/study", response_model=StudyInfo)
    def study_info() -> StudyInfo:
        """The question raters answer, the pairs each rater sees, and whether names must be invite codes."""
        return StudyInfo(
            question=store.question, total=store.trials_per_rater, invites_required=store.invites_only
        )

    @app.get("/api/next", response_model=NextPair)
    def next_pair(rater: str = Query(..., description="The rater's name, or invite code.")) -> NextPair:
        """The rater's next pair without a vote (a new rater is registered with their own order of
        pairs and sides); ``pair`` is null when the rater has voted on every pair."""
        trial = store.next_trial(rater)
        return NextPair(
            **{**trial, "left": image_url(trial["left"]), "right": image_url(trial["right"])},
            question=store.question,
        )

    @app.post("/api/vote", response_model=VoteResult)
    def vote(body: VoteRequest) -> VoteResult:
        """Record a vote (a second vote on the same pair replaces the first); committed before answering."""
        return VoteResult(**store.vote(body.rater, body.pair, body.choice))

    @app.post("/api/undo", response_model=UndoResult)
    def undo(body: UndoRequest) -> UndoResult:
        """Remove the rater's most recent vote, so that pair comes next again."""
        return UndoResult(**store.undo(body.rater))

    @app.get("/images/{name}", include_in_schema=False)
    def image(name: str) -> Response:
        path = store.image_file(name)
        if path is None or not path.is_file():
            return JSONResponse({"detail": f"no image {name!r} in this study"}, status_code=404)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"))

    return app
