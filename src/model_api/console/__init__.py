"""The web console at ``/console``: server-rendered pages (Jinja) with a little
JavaScript for the playground's streaming, for customers (playground, quota,
history, keys, usage) and admins (users, keys, usage by user/model, the audit
log). Everything it shows or changes goes through the same services as
``/admin`` and ``/me``; nothing is loaded from elsewhere (no CDN).

Sign-in is a password form into Flask's signed session cookie (``HttpOnly``,
``SameSite=Lax``, ``Secure`` in production), throttled like Basic sign-ins.
Every state change (forms and the playground's fetch) carries a CSRF token
(Flask-WTF's ``CSRFProtect``, applied to this blueprint only: the JSON API
authenticates each request with Basic or Bearer, which a browser never sends
on its own, so it needs none).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

from apiflask import APIBlueprint, APIFlask
from flask import Response, abort, flash, g, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from marshmallow import ValidationError

from ..api import context, security, streaming
from ..api.admin_schemas import MAX_QUOTA, When
from ..api.schemas import ChatCompletionIn, check_text
from ..engine.base import GenerationRequest
from ..models import CallKind
from ..services import admin, usage
from ..services.auth import UserError
from ..services import auth as auth_service

bp = APIBlueprint("console", __name__, url_prefix="/console", enable_openapi=False,
                  template_folder="templates", static_folder="static", static_url_path="/static")
csrf = CSRFProtect()

#: how long a console session lasts without signing in again
SESSION_HOURS = 12
#: days the usage charts cover
CHART_DAYS = 30
#: groups (users, keys, models) a usage page shows; the CSV download has them all
TOP_GROUPS = 25


def init_app(app: APIFlask) -> None:
    settings = app.config["SETTINGS"]
    # the session cookie is signed with a key derived from SECRET_KEY (which also
    # keys the credential cache); without one, a random key per process: sessions
    # then end with the process, and several processes need SECRET_KEY set
    secret = settings.secret_key or secrets.token_hex(32)
    app.secret_key = hmac.new(secret.encode(), b"model-api console session", hashlib.sha256).hexdigest()
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.env == "production",
        SESSION_COOKIE_NAME="model_api_session",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        WTF_CSRF_CHECK_DEFAULT=False,  # only the console's own state changes (see _protect)
        WTF_CSRF_TIME_LIMIT=None,  # a token lives as long as its session
    )
    csrf.init_app(app)
    app.register_blueprint(bp)


# --- who is signed in ------------------------------------------------------------------------

def _fingerprint(password_hash: str) -> str:
    """Tied to the password: changing it signs every session of that user out."""
    return hashlib.sha256(b"session\0" + password_hash.encode()).hexdigest()[:16]


def _load_user() -> Any | None:
    uid = session.get("uid")
    if not isinstance(uid, int):
        return None
    rt = context.runtime()
    with rt.db.session() as s:
        user = s.get(admin.User, uid)
        if user is None or not user.is_active or session.get("pw") != _fingerprint(user.password_hash):
            session.clear()
            return None
        s.expunge(user)
    return user


@bp.before_request
def _protect() -> Response | None:
    if request.endpoint in ("console.static",):
        return None
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        csrf.protect()  # CSRFError (refused below) without a valid token
    g.console_user = _load_user()
    return None


@bp.errorhandler(CSRFError)
def _csrf_refused(exc: CSRFError):
    if request.is_json:
        return {"error": {"code": "csrf_failed", "message": f"refused: {exc.description} Reload the page."}}, 403
    return render_template("console/error.html", title="Refused",
                           message=f"Refused: {exc.description} Reload the page and try again."), 403


def signed_in(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if g.console_user is None:
            if request.is_json or request.method != "GET":
                return {"error": {"code": "unauthorized", "message": "sign in first"}}, 401
            return redirect(url_for("console.login", next=request.path))
        return view(*args, **kwargs)

    return wrapper


def admin_only(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if not g.console_user.is_admin:
            return render_template("console/error.html", title="Forbidden",
                                   message="This page is for administrators."), 403
        return view(*args, **kwargs)

    return signed_in(wrapper)


def _actor() -> admin.Actor:
    return admin.Actor(g.console_user.id, g.get("request_id"))


@bp.app_context_processor
def _globals() -> dict[str, Any]:
    return {"user": g.get("console_user")}


# --- sign-in -----------------------------------------------------------------------------------

def _safe_next(target: str | None) -> str:
    """Only a path of this console (never another site) after sign-in."""
    if target and target.startswith("/console") and "//" not in target and "\\" not in target:
        return target
    return url_for("console.home")


@bp.get("/login")
def login():
    if g.console_user is not None:
        return redirect(url_for("console.home"))
    return render_template("console/login.html", next=request.args.get("next", ""))


@bp.post("/login")
def login_post():
    rt = context.runtime()
    username = request.form.get("username", "")[:200]
    password = request.form.get("password", "")[:1024]
    address = request.remote_addr or ""
    nxt = request.form.get("next")
    wait = rt.login_throttle.wait(username, address) if username else 0
    if wait:
        security.auth_failed("session", "throttled", username)
        return render_template("console/login.html", next=nxt,
                               error=f"Too many failed sign-ins: try again in {wait} s."), 429
    row = None
    if security.possible_username(username) and "\x00" not in password:
        with rt.db.autocommit() as conn:
            row = auth_service.authenticate(conn, username, password, rt.credentials)
    if row is None:
        security.auth_failed("session", "invalid", username or None)
        if username:
            rt.login_throttle.failed(username, address)
        return render_template("console/login.html", next=nxt, error="Wrong username or password."), 401
    session.clear()  # a new session on sign-in (no fixation)
    session.permanent = True
    session["uid"] = row.id
    session["pw"] = _fingerprint(row.password_hash)
    return redirect(_safe_next(nxt))


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("console.login"))


# --- customer pages -------------------------------------------------------------------------

def _me() -> dict[str, Any]:
    rt = context.runtime()
    with rt.db.session() as s:
        return admin.me(s, g.console_user.id, rt.policy)


@bp.get("/")
@signed_in
def home():
    rt = context.runtime()
    allowed = g.console_user.allowed_models
    models = [e.id for e in rt.models if allowed is None or e.id in allowed]
    return render_template("console/home.html", me=_me(), models=models, default_model=rt.models.default)


@bp.post("/chat")
@signed_in
@bp.input(ChatCompletionIn, location="json")
def chat(json_data: dict):
    """The playground: a streamed chat for the signed-in user (the same call, quota
    and row as ``/v1/chat/completions`` with ``stream: true``)."""
    rt = context.runtime()
    with rt.db.autocommit() as conn:
        row = admin.account(conn, g.console_user.id)
    if row is None:
        return {"error": {"code": "unauthorized", "message": "sign in first"}}, 401
    security.act_as(security.principal_of(row, rt))
    model = context.model_entry(json_data.get("model"))
    messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in json_data["messages"]]
    request_ = GenerationRequest.chat(messages, context.sampling_params(json_data, model))
    return streaming.start(context.intent(request_, CallKind.CHAT, model), chat=True, include_usage=True)


@bp.get("/history")
@signed_in
def history():
    rt = context.runtime()
    calls = rt.history.page(g.console_user.id, 50)
    return render_template("console/history.html", calls=calls, iso=usage.iso)


@bp.get("/keys")
@signed_in
def keys():
    rt = context.runtime()
    with rt.db.session() as s:
        rows = [admin.key_view(k, g.console_user.username) for k in admin.list_keys(s, g.console_user.id)]
    return render_template("console/keys.html", keys=rows, new_key=session.pop("new_key", None))


def _form_text(name: str) -> str | None:
    """A form field as text the database can take; UserError naming the field otherwise."""
    value = (request.form.get(name) or "").strip()
    try:
        return check_text(value) or None
    except ValidationError as exc:
        raise UserError(f"{name} {exc.messages[0]}") from None


def _expiry(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        return When().deserialize(raw)
    except ValidationError:
        raise UserError("expiry must be a date like 2027-01-31") from None


@bp.post("/keys")
@signed_in
def create_key():
    rt = context.runtime()
    try:
        with rt.db.session() as s:
            user = s.get(admin.User, g.console_user.id)
            name = _form_text("name")
            new, _row = admin.create_key(s, _actor(), user, name, _expiry(request.form.get("expires_at")))
    except UserError as exc:
        flash(str(exc), "error")
        return redirect(url_for("console.keys"))
    # shown once, on the next page only (the session cookie is signed and HttpOnly)
    session["new_key"] = new.key
    return redirect(url_for("console.keys"))


@bp.post("/keys/<int:key_id>/revoke")
@signed_in
def revoke_key(key_id: int):
    rt = context.runtime()
    owner = None if g.console_user.is_admin and request.form.get("any") else g.console_user.id
    try:
        with rt.db.session() as s:
            admin.revoke_key(s, _actor(), key_id, owner_id=owner)
        flash("Key revoked.", "ok")
    except UserError as exc:
        flash(str(exc), "error")
    return redirect(url_for("console.admin_keys" if request.form.get("back") == "admin" else "console.keys"))


def _usage_rows(group_by: str, days: int, user_id: int | None):
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
    rt = context.runtime()
    with rt.db.session() as s:
        return usage.report(s, group_by, since, None, user_id), since


@bp.get("/usage")
@signed_in
def usage_page():
    is_admin = g.console_user.is_admin
    groups = usage.GROUPS if is_admin else tuple(x for x in usage.GROUPS if x != "user")
    group_by = request.args.get("group_by", "day")
    if group_by not in groups:
        group_by = "day"
    scope = None if is_admin and request.args.get("scope") == "all" else g.console_user.id
    rows, since = _usage_rows(group_by, CHART_DAYS, scope)
    if group_by == "day":
        rows = _every_day(rows, since, CHART_DAYS)
    totals = usage.totals(rows)
    shown = rows if group_by == "day" else rows[:TOP_GROUPS]  # busiest first; the CSV has every row
    return render_template("console/usage.html", rows=shown, more=len(rows) - len(shown), group_by=group_by,
                           groups=groups, totals=totals, scope="all" if scope is None else "mine",
                           chart=bar_chart([(r.label, r.calls) for r in shown]), days=CHART_DAYS)


@bp.get("/usage.csv")
@signed_in
def usage_csv():
    is_admin = g.console_user.is_admin
    group_by = request.args.get("group_by", "day")
    if group_by not in usage.GROUPS or (group_by == "user" and not is_admin):
        abort(400)
    scope = None if is_admin and request.args.get("scope") == "all" else g.console_user.id
    rows, _ = _usage_rows(group_by, CHART_DAYS, scope)
    return Response(usage.to_csv(rows, group_by), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="usage-by-{group_by}.csv"'})


def _every_day(rows: list[usage.UsageRow], since: datetime, days: int) -> list[usage.UsageRow]:
    """Days without calls as zero rows, so the chart's axis is continuous."""
    have = {r.group: r for r in rows}
    out = []
    for i in range(days):
        day = (since + timedelta(days=i)).date().isoformat()
        out.append(have.get(day) or usage.UsageRow(day, day, 0, 0, 0, 0, 0, 0, 0.0))
    return out


def bar_chart(points: list[tuple[str, float]], width: int = 720, height: int = 180) -> dict[str, Any]:
    """An inline SVG bar chart's geometry (drawn by the template: no chart library to ship)."""
    top = max((v for _, v in points), default=0) or 1
    n = max(len(points), 1)
    slot = width / n
    bars = [{"x": round(i * slot + slot * 0.1, 1), "w": round(slot * 0.8, 1),
             "h": round(v / top * (height - 20), 1), "y": round(height - v / top * (height - 20), 1),
             "label": label, "value": v} for i, (label, v) in enumerate(points)]
    return {"width": width, "height": height, "bars": bars, "top": top}


# --- admin pages ---------------------------------------------------------------------------------

def _arg(name: str) -> str | None:
    """A query argument the database can take (text without NUL or lone surrogates), else None."""
    value = (request.args.get(name) or "")[:150]
    try:
        return check_text(value) or None
    except ValidationError:
        return None


@bp.get("/admin/users")
@admin_only
def admin_users():
    rt = context.runtime()
    with rt.db.session() as s:
        users = admin.list_users(s, rt.policy, 50, _arg("after"), _arg("q"))
    return render_template("console/admin_users.html", users=users,
                           next_after=users[-1]["username"] if len(users) == 50 else None)


def _int_field(name: str) -> int | None:
    raw = (request.form.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > MAX_QUOTA:
        raise UserError(f"{name} must be a whole number from 0 to {MAX_QUOTA}")
    return int(raw)


@bp.post("/admin/users")
@admin_only
def admin_create_user():
    rt = context.runtime()
    try:
        username = request.form.get("username") or ""
        password = request.form.get("password") or ""
        for value in (username, password):
            try:
                check_text(value)
            except ValidationError as exc:
                raise UserError(f"username and password {exc.messages[0]}") from None
        with rt.db.session() as s:
            admin.create_user(s, _actor(), username, password,
                              _int_field("quota"), request.form.get("admin") == "on")
        flash(f"Created {username}.", "ok")
    except UserError as exc:
        flash(str(exc), "error")
    return redirect(url_for("console.admin_users"))


@bp.post("/admin/users/<path:username>")
@admin_only
def admin_update_user(username: str):
    rt = context.runtime()
    action = request.form.get("action")
    try:
        with rt.db.session() as s:
            if action == "quota":
                admin.update_user(s, _actor(), username, quota_=_int_field("quota"),
                                  clear_quota=not (request.form.get("quota") or "").strip(),
                                  reset_usage=request.form.get("reset_usage") == "on")
            elif action in ("deactivate", "activate"):
                admin.update_user(s, _actor(), username, active=action == "activate")
            else:
                raise UserError("unknown action")
        flash(f"Updated {username}.", "ok")
    except UserError as exc:
        flash(str(exc), "error")
    return redirect(url_for("console.admin_users"))


@bp.get("/admin/keys")
@admin_only
def admin_keys():
    rt = context.runtime()
    with rt.db.session() as s:
        rows = [admin.key_view(k) for k in admin.list_keys(s, None, False, 200)]
        users = admin.usernames(s)
    return render_template("console/admin_keys.html", keys=rows, users=users, new_key=session.pop("new_key", None))


@bp.post("/admin/keys")
@admin_only
def admin_create_key():
    rt = context.runtime()
    try:
        with rt.db.session() as s:
            user = admin.get_user(s, _form_text("user") or "")
            name = _form_text("name")
            new, _row = admin.create_key(s, _actor(), user, name, _expiry(request.form.get("expires_at")))
        session["new_key"] = new.key
    except UserError as exc:
        flash(str(exc), "error")
    return redirect(url_for("console.admin_keys"))


@bp.get("/admin/events")
@admin_only
def admin_events():
    rt = context.runtime()
    with rt.db.session() as s:
        rows = admin.events(s, 200)
    return render_template("console/admin_events.html", events=rows)
