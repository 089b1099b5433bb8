"""The review page's routes: People, a Person, Doubtful, Corrections, the face and photo images,
and the actions (each one correction of :mod:`organizer.corrections`, made with source "page").

Pages are rendered on the server (Jinja2); the browser needs no build step and runs a few lines
of plain JavaScript (static/app.js) at most. Reads go through the store's review queries
(store_review.py) on a read-only connection; every change goes through the same Python API as
the CLI, in a short write of its own (see :meth:`Review.edit`), so the page and a running
service share one store.

Every value a request carries is parsed strictly: ids are integers looked up in the store
(images are served by face id only, never by a path from the request), pages are positive
integers, and anything else is a 400 or a 404 before the store is touched.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..config import Settings
from ..corrections import CorrectionError, Corrections, describe, record
from ..ingest import IngestError, jpeg_bytes, open_upright
from ..output import CropCache, face_crop, folder_name
from ..store import Face, Store, StoreError
from ..store_review import ReviewQueries
from .security import LOGIN, Guard, Secrets, give_cookie, same

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FACES_PER_PAGE = 60
PEOPLE_PER_PAGE = 120
DOUBTFUL_PER_PAGE = 90
PHOTO_SIDE = 1600  # a whole photo is shown at most this many pixels a side
IMAGE_CACHE = "private, max-age=3600"  # face ids are never reused: a face's crop never changes
_BACK = re.compile(r"/[A-Za-z0-9_/?=&%-]*")  # where a form returns to: a path of this page


def _int(value: str | None, what: str, minimum: int = 1) -> int:
    """A whole number from a request (ASCII digits only: no sign, no space, no path)."""
    if value is None or not re.fullmatch(r"[0-9]{1,12}", value) or int(value) < minimum:
        raise HTTPException(400, f"{what} must be a whole number")
    return int(value)


def _page(request: Request) -> int:
    value = request.query_params.get("page")
    return 1 if value is None else _int(value, "page")


def by_distance(ids: np.ndarray, enc: np.ndarray) -> list[tuple[int, float]]:
    """(face id, distance) of a person's faces, the farthest from the person first: the distance
    is to the mean of their encodings, so the faces most likely to be someone else come first."""
    if len(ids) == 0:
        return []
    dist = np.linalg.norm(enc - enc.mean(axis=0), axis=1)
    order = np.lexsort((ids, -dist))
    return [(int(ids[i]), float(dist[i])) for i in order]


class Review:
    """One review page over one store: reads, images, and edits through the store's API."""

    def __init__(self, settings: Settings, keys: Secrets):
        self.settings = settings
        self.db_path = settings.db_path
        self.keys = keys
        self.images = CropCache()
        self.flash: tuple[str, str] | None = None  # (kind, message) shown once on the next page
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    # ---- the store -----------------------------------------------------------------------
    def store(self) -> Store:
        """This thread's read-only handle (SQLite connections belong to one thread)."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store.open_readonly(self.db_path)
        return store

    def queries(self) -> ReviewQueries:
        """The review queries over this thread's read-only handle."""
        return ReviewQueries(self.store())

    def people(self) -> list[dict]:
        """Every person of the People grid. Counting them reads every face (0.5 s at 100k), so
        the list is kept until the store changes: this connection's data_version moves whenever
        another one commits (the service, a command, this page's own edits)."""
        store = self.store()
        version = store.data_version()
        cached = getattr(self._local, "people", None)
        if cached is None or cached[0] != version:
            cached = self._local.people = (version, ReviewQueries(store).page_people())
        return cached[1]

    def edit(self, change: Callable[[Corrections], str]) -> str:
        """Make one correction (source "page") through :func:`organizer.corrections.record`, as
        the CLI does: beside a running service it is one write through SQLite's locking, which the
        service notices (data_version) and applies; with none, this process applies it and
        updates the folders itself. One at a time from this page."""
        with self._write_lock:
            try:
                return record(self.settings, change)
            except CorrectionError as exc:
                raise UserError(str(exc)) from None

    # ---- rendering -----------------------------------------------------------------------
    def render(self, request: Request, name: str, **context) -> Response:
        flash, self.flash = self.flash, None
        return self.templates.TemplateResponse(
            request, name, {"csrf": self.keys.csrf, "flash": flash, "back": _here(request), **context})

    def names(self, queries: ReviewQueries) -> dict[int, str]:
        """Every cluster id -> what the page calls it (its name, or its folder's cluster_N)."""
        return {cid: name or folder_name(cid, None) for cid, name in queries.person_names()}

    # ---- pages ---------------------------------------------------------------------------
    async def people_page(self, request: Request) -> Response:
        page = _page(request)
        store = self.store()
        people = self.people()
        pages = max(1, -(-len(people) // PEOPLE_PER_PAGE))
        if page > pages:
            raise HTTPException(404, "no such page")
        shown = people[(page - 1) * PEOPLE_PER_PAGE : page * PEOPLE_PER_PAGE]
        return self.render(request, "people.html", people=shown, total=len(people), page=page, pages=pages,
                           doubtful=self.queries().doubtful_count(),
                           hidden_people=Corrections(store).people(hidden=True))

    async def person_page(self, request: Request) -> Response:
        cid = request.path_params["cid"]
        page = _page(request)
        store = self.store()
        queries = ReviewQueries(store)
        person = queries.page_person(cid)
        if person is None:
            raise HTTPException(404, "no such person")
        ordered = by_distance(*queries.person_encodings(cid))
        pages = max(1, -(-len(ordered) // FACES_PER_PAGE))
        if page > pages:
            raise HTTPException(404, "no such page")
        shown = ordered[(page - 1) * FACES_PER_PAGE : page * FACES_PER_PAGE]
        faces = [(store.face(fid), dist) for fid, dist in shown]
        paths = queries.paths_for_shas(f.sha256 for f, _ in faces)
        names = self.names(queries)
        return self.render(request, "person.html", person=person, title=names[cid], faces=faces,
                           photo_names={f.id: Path(paths.get(f.sha256, "?")).name for f, _ in faces},
                           names=names, page=page, pages=pages)

    async def doubtful_page(self, request: Request) -> Response:
        page = _page(request)
        queries = self.queries()
        total = queries.doubtful_count()
        pages = max(1, -(-total // DOUBTFUL_PER_PAGE))
        if page > pages:
            raise HTTPException(404, "no such page")
        faces = queries.doubtful_page(DOUBTFUL_PER_PAGE, (page - 1) * DOUBTFUL_PER_PAGE)
        paths = queries.paths_for_shas(f.sha256 for f in faces)
        names = self.names(queries)
        groups: list[tuple[int | None, list[Face]]] = []
        for f in faces:
            near = f.nearest_cluster if f.nearest_cluster in names else None
            if not groups or groups[-1][0] != near:
                groups.append((near, []))
            groups[-1][1].append(f)
        return self.render(request, "doubtful.html", groups=groups, names=names, total=total, page=page,
                           pages=pages, photo_names={f.id: Path(paths.get(f.sha256, "?")).name for f in faces})

    async def login_page(self, request: Request) -> Response:
        if self.keys.password is None:
            return RedirectResponse("/", 303)
        if request.method == "GET":
            return self.render(request, "login.html")
        form = await request.form()
        if not same(form.get("csrf"), self.keys.csrf):
            return PlainTextResponse("the form is out of date (missing or wrong CSRF token): reload the page", 403)
        if not same(form.get("password"), self.keys.password):
            self.flash = ("error", "wrong password")
            return RedirectResponse(LOGIN, 303)
        response = RedirectResponse("/", 303)
        give_cookie(response, self.keys)
        return response

    # ---- images --------------------------------------------------------------------------
    async def face_image(self, request: Request) -> Response:
        return await self._image(request.path_params["fid"], whole=False)

    async def photo_image(self, request: Request) -> Response:
        return await self._image(request.path_params["fid"], whole=True)

    async def _image(self, face_id: int, whole: bool) -> Response:
        key = (face_id, whole)
        data = self.images.get(key)
        if data is None:
            store = self.store()
            face = store.face(face_id)
            path = store.path_for_sha(face.sha256) if face is not None else None
            if path is None:
                raise HTTPException(404, "no such face")
            try:
                data = await run_in_threadpool(self._draw, Path(path), face, whole)
            except (OSError, IngestError) as exc:
                log.warning("review page: cannot read the photo of face %d: %s", face_id, exc)
                raise HTTPException(404, "the photo of this face cannot be read") from None
            self.images.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})

    def _draw(self, path: Path, face: Face, whole: bool) -> bytes:
        """The face's crop (as the tree's crops), or its whole photo scaled down. Pillow opens the
        original read-only; nothing is ever written next to it."""
        max_pixels = self.settings.detection.max_pixels
        if not whole:
            return jpeg_bytes(face_crop(path, (face.top, face.right, face.bottom, face.left), max_pixels), 88)
        image = open_upright(path, max_pixels)
        image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
        return jpeg_bytes(image, 88)

    # ---- actions (each one correction of organizer.corrections) --------------------------
    def _person(self, request: Request) -> dict:
        person = self.queries().page_person(request.path_params["cid"])
        if person is None:
            raise HTTPException(404, "no such person")
        return person

    def _faces(self, form, where: Callable[[Face], bool]) -> list[int]:
        """The faces a form is about (``only``: one face's own button; else the ticked ones); each
        must exist and pass ``where`` (be on the page the form came from)."""
        raw = [form["only"]] if form.get("only") else form.getlist("face")
        if not raw:
            raise UserError("select some faces first")
        store, ids = self.store(), []
        for value in raw:
            face = store.face(_int(value, "a face id"))
            if face is None:
                raise HTTPException(404, "no such face")
            if not where(face):
                raise HTTPException(400, f"face {face.id} is not on this page any more: reload it")
            ids.append(face.id)
        return ids

    def _target(self, c: Corrections, form) -> int:
        text = (form.get("target") or "").strip()
        if not text:
            raise UserError("say who it is: type a name (or cluster_N)")
        return c.person_id(text)

    async def rename(self, request: Request, form) -> str:
        cid = self._person(request)["id"]
        name = (form.get("name") or "").strip() or None

        def change(c: Corrections) -> str:
            c.name(cid, name, source=SOURCE)
            return f"cluster_{cid} is now {c.store.person(cid)['name']}" if name else f"cluster_{cid} has no name now"

        return await run_in_threadpool(self.edit, change)

    def _in(self, cid: int) -> Callable[[Face], bool]:
        return lambda f: f.cluster_id == cid and not f.doubtful

    async def reject(self, request: Request, form) -> str:
        cid = self._person(request)["id"]
        faces = self._faces(form, self._in(cid))

        def change(c: Corrections) -> str:
            c.reject(faces, cid, source=SOURCE)
            return f"{_n(faces)} no longer in {c.label(cid)} (see Doubtful)"

        return await run_in_threadpool(self.edit, change)

    async def assign(self, request: Request, form) -> str:
        cid = self._person(request)["id"]
        faces = self._faces(form, self._in(cid))

        def change(c: Corrections) -> str:
            target = self._target(c, form)
            if target == cid:
                raise UserError(f"those faces are in {c.label(cid)} already")
            c.assign(faces, target, source=SOURCE, from_person=cid)
            return f"{_n(faces)} moved to {c.label(target)}"

        return await run_in_threadpool(self.edit, change)

    async def split(self, request: Request, form) -> str:
        cid = self._person(request)["id"]
        faces = self._faces(form, self._in(cid))
        name = (form.get("new_name") or "").strip()
        if not name:
            raise UserError("give the new person a name")

        def change(c: Corrections) -> str:
            pid = c.split(name, faces, source=SOURCE, from_person=cid)
            return f"new person {c.label(pid)} with {_n(faces)} from {c.label(cid)}"

        return await run_in_threadpool(self.edit, change)

    async def merge(self, request: Request, form) -> str:
        cid = self._person(request)["id"]

        def change(c: Corrections) -> str:
            target, before = self._target(c, form), c.label(cid)
            c.merge(cid, target, source=SOURCE)
            return f"{before} merged into {c.label(target)}"

        return await run_in_threadpool(self.edit, change)

    async def hide(self, request: Request, form) -> str:
        cid = self._person(request)["id"]

        def change(c: Corrections) -> str:
            c.hide(cid, source=SOURCE)
            return f"{c.label(cid)} is hidden: no folder, and their future faces go nowhere"

        return await run_in_threadpool(self.edit, change)

    async def unhide(self, request: Request, form) -> str:
        cid = self._person(request)["id"]

        def change(c: Corrections) -> str:
            c.unhide(cid, source=SOURCE)
            return f"{c.label(cid)} is shown again"

        return await run_in_threadpool(self.edit, change)

    async def assign_doubtful(self, request: Request, form) -> str:
        faces = self._faces(form, lambda f: f.doubtful)

        def change(c: Corrections) -> str:
            target = self._target(c, form)
            for fid in faces:
                c.assign([fid], target, source=SOURCE, from_person=c.store.face(fid).cluster_id)
            return f"{_n(faces)} now in {c.label(target)}"

        return await run_in_threadpool(self.edit, change)

    async def stranger(self, request: Request, form) -> str:
        faces = self._faces(form, lambda f: f.doubtful)

        def change(c: Corrections) -> str:
            # a stranger is a hidden person of its own (as a folder deleted in the tree): in no
            # folder, and faces like it later go nowhere either
            for fid in faces:
                c.hide(c.split(f"stranger_{fid}", [fid], source=SOURCE), source=SOURCE)
            return f"{_n(faces)} hidden as stranger{'s' if len(faces) > 1 else ''}"

        return await run_in_threadpool(self.edit, change)

    async def undo(self, request: Request, form) -> str:
        def change(c: Corrections) -> str:
            done = c.undo()
            return "nothing to undo" if done is None else f"undone: {describe(done, c.label)}"

        return await run_in_threadpool(self.edit, change)

    async def corrections_page(self, request: Request) -> Response:
        c = Corrections(self.store())
        rows = [(r, describe(r, c.label)) for r in reversed(c.history())]
        return self.render(request, "corrections.html", rows=rows,
                           when={r.id: time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)) for r, _ in rows})


SOURCE = "page"  # how the corrections made here are recorded


def _n(faces: list[int]) -> str:
    return "1 face" if len(faces) == 1 else f"{len(faces)} faces"


class UserError(Exception):
    """A change the page refuses with a message (a name already taken, a reserved name, ...)."""


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _back(form) -> str:
    back = form.get("back") or "/"
    return back if _BACK.fullmatch(back) and not back.startswith("//") else "/"


def action(review: Review, handler) -> Callable:
    """A POST endpoint: checks the CSRF token, runs ``handler(request, form)``, shows its message
    (or the refusal) on the page the form came from."""

    async def endpoint(request: Request) -> Response:
        form = await request.form()
        if not same(form.get("csrf"), review.keys.csrf):
            return PlainTextResponse("the form is out of date (missing or wrong CSRF token): reload the page", 403)
        try:
            review.flash = ("ok", await handler(request, form))
        except (UserError, StoreError) as exc:
            review.flash = ("error", str(exc))
        return RedirectResponse(_back(form), 303)

    return endpoint


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return PlainTextResponse(exc.detail or "error", exc.status_code)


async def _store_error(request: Request, exc: StoreError) -> Response:
    return PlainTextResponse(f"the store cannot be read: {exc}", 503)


def create_app(settings: Settings, keys: Secrets | None = None) -> Starlette:
    """The review page over ``settings``' store, guarded by ``keys`` (new ones when not given)."""
    if keys is None:
        password = settings.web.password
        keys = Secrets(password.get_secret_value() if password else None)
    review = Review(settings, keys)
    routes = [
        Route("/", review.people_page),
        Route("/person/{cid:int}", review.person_page),
        Route("/doubtful", review.doubtful_page),
        Route("/face/{fid:int}.jpg", review.face_image),
        Route("/face/{fid:int}/photo.jpg", review.photo_image),
        Route(LOGIN, review.login_page, methods=["GET", "POST"]),
        Route("/corrections", review.corrections_page),
        Route("/undo", action(review, review.undo), methods=["POST"]),
        Route("/faces/assign", action(review, review.assign_doubtful), methods=["POST"]),
        Route("/faces/stranger", action(review, review.stranger), methods=["POST"]),
        *[Route(f"/person/{{cid:int}}/{verb}", action(review, handler), methods=["POST"]) for verb, handler in {
            "name": review.rename, "reject": review.reject, "assign": review.assign, "split": review.split,
            "merge": review.merge, "hide": review.hide, "unhide": review.unhide}.items()],
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, keys=keys)],
                    exception_handlers={HTTPException: _http_error, StoreError: _store_error})
    app.state.review = review
    return app
