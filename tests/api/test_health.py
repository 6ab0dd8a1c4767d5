def test_health_check_is_204_empty_without_auth(client):
    r = client.get("/health_check")
    assert r.status_code == 204
    assert r.data == b""


def test_ready_reports_database_and_model(app, client):
    app.extensions["model_api"].engine  # load the real model
    r = client.get("/ready")
    assert r.status_code == 200, r.json
    comps = r.json["components"]
    assert comps["database"]["status"] == "ready"
    assert comps["model"]["status"] == "ready"
    assert comps["model"]["name"].startswith("SmolLM2")
    assert comps["model"]["context_size"] > 0


def test_ready_is_503_when_the_database_is_down(make_app):
    app = make_app(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    r = app.test_client().get("/ready")
    assert r.status_code == 503
    assert r.json["components"]["database"]["status"] == "error"
    assert r.json["status"] == "not ready"


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/health_check", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert len(client.get("/health_check").headers["X-Request-ID"]) == 32
