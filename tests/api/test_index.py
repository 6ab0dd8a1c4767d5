"""`GET /` says what the service is and where to go (it was a bare 404)."""


def test_root_points_to_the_docs_and_health_checks(client):
    r = client.get("/")
    assert r.status_code == 200 and r.is_json
    body = r.get_json()
    assert body["name"] == "ML Model API" and body["version"]
    assert body["links"] == {"docs": "/docs", "openapi": "/openapi.json", "health": "/health_check",
                             "ready": "/ready"}
    for path in body["links"].values():
        assert client.get(path).status_code in (200, 204, 503), path  # /ready: 503 until the model loads
    assert "/" in client.get("/openapi.json").get_json()["paths"]
