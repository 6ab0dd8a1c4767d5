"""/ready for anonymous callers (issue 16): what is up, never where (paths, hosts, errors)."""

from __future__ import annotations


# --- (15) /ready tells anonymous callers what is up, not where -----------------------------------

def _ready(client, remote_addr: str, headers: dict[str, str] | None = None):
    return client.get("/ready", headers=headers or {}, environ_base={"REMOTE_ADDR": remote_addr})


def test_ready_shows_a_remote_anonymous_caller_only_statuses(make_app):
    app = make_app(database_url="postgresql+psycopg://nobody:secret@127.0.0.1:1/none", model_path="/srv/x.gguf")
    r = _ready(app.test_client(), "203.0.113.7")
    assert r.status_code == 503
    assert r.json["components"] == {"database": {"status": "error"}, "model": {"status": "not loaded"}}
    assert "/srv" not in r.get_data(as_text=True)


def test_ready_hides_the_model_path_from_a_remote_anonymous_caller(app):
    app.extensions["model_api"].engine  # load the real model
    body = _ready(app.test_client(), "203.0.113.7").json
    assert body["components"]["model"] == {"status": "ready"}


def test_ready_shows_details_to_a_local_caller_and_to_the_metrics_token(make_app):
    app = make_app(metrics_token="t" * 32)
    app.extensions["model_api"].engine
    client = app.test_client()
    for r in (_ready(client, "127.0.0.1"), _ready(client, "203.0.113.7", {"Authorization": "Bearer " + "t" * 32})):
        model = r.json["components"]["model"]
        assert model["model_path"].endswith(".gguf") and "latency_ms" in model


def test_ready_details_are_hidden_from_local_callers_when_metrics_local_open_is_off(make_app):
    app = make_app(metrics_local_open=False)
    body = _ready(app.test_client(), "127.0.0.1").json
    assert all(set(c) == {"status"} for c in body["components"].values())
