"""The OpenAPI document: valid, complete (errors, headers, auth, examples) and served
with a Swagger UI that needs no internet."""

from __future__ import annotations

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate


def test_openapi_document_is_valid_openapi_3(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises with the reason if invalid


def test_every_error_uses_the_shared_shape_and_every_response_has_a_request_id(client):
    spec = client.get("/openapi.json").json
    assert spec["components"]["schemas"]["ErrorOut"]["required"] == ["error"]
    assert set(spec["components"]["schemas"]["ErrorBody"]["required"]) == {"code", "message"}
    seen = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, resp in op["responses"].items():
                assert "X-Request-ID" in resp.get("headers", {}), (method, path, status)
                if int(status) >= 400 and (path, status) != ("/ready", "503"):  # /ready: same body as 200
                    seen += 1
                    schema = resp["content"]["application/json"]["schema"]
                    # /v1 answers in OpenAI's error shape (its SDKs parse it), everything else in ours
                    shape = "OpenAIErrorOut" if path.startswith("/v1/") else "ErrorOut"
                    assert schema == {"$ref": f"#/components/schemas/{shape}"}, (method, path, status)
    assert seen >= 20


def test_model_calls_document_auth_rate_headers_and_the_seed_examples(client):
    spec = client.get("/openapi.json").json
    assert spec["components"]["securitySchemes"]["BasicAuth"] == {
        "type": "http", "scheme": "basic", "description": "Your username and password (HTTP Basic)."}
    assert spec["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"  # API keys
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/") or path in ("/call_model", "/async_call_model", "/async_call_status",
                                                   "/async_call_cancel", "/calls"):
                assert op["security"] == [{"BasicAuth": []}, {"BearerAuth": []}], (method, path)
    call = spec["paths"]["/call_model"]["post"]
    assert call["requestBody"]["required"] is True
    assert call["requestBody"]["content"]["application/json"]["example"] == {"prompt": "Hello, world!"}
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining"} <= set(call["responses"]["201"]["headers"])
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "Retry-After"} <= set(call["responses"]["429"]["headers"])
    assert "WWW-Authenticate" in call["responses"]["401"]["headers"]
    assert call["responses"]["429"]["content"]["application/json"]["example"]["error"]["code"] == "quota_exceeded"
    for status in ("400", "401", "413", "422", "429", "500", "503"):
        assert status in call["responses"], status
    async_ok = spec["paths"]["/async_call_model"]["post"]["responses"]["200"]
    assert async_ok["content"]["application/json"]["example"] == {"job_id": "6fde421b-5079-4c22-ad78-e65a6fefaaaf"}
    status_ok = spec["paths"]["/async_call_status"]["get"]["responses"]["200"]["content"]["application/json"]
    assert status_ok["examples"]["processing"]["value"]["job_status"] == "processing"
    assert status_ok["examples"]["processing"]["value"]["response"] is None
    # "stream": true answers 200 with Server-Sent Events, not JSON
    assert "text/event-stream" in call["responses"]["200"]["content"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(ok), path
    cancel = spec["paths"]["/async_call_cancel"]["post"]["responses"]
    assert {"200", "202", "400", "401", "404", "409"} <= set(cancel)
    assert cancel["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/StatusOut"}
    assert {"200", "400", "401"} <= set(spec["paths"]["/calls"]["get"]["responses"])
    assert "503" in spec["paths"]["/ready"]["get"]["responses"]
    assert spec["paths"]["/health_check"]["get"]["responses"]["204"]


def test_documented_max_tokens_follows_the_setting(make_app):
    spec = make_app(max_tokens_cap=7).test_client().get("/openapi.json").json
    props = spec["components"]["schemas"]["CallModelIn"]["properties"]
    assert props["max_tokens"]["maximum"] == 7
    assert props["top_p"]["exclusiveMinimum"] == 0  # 0 is refused, so the document says so


def test_real_error_bodies_match_the_documented_schema(client, make_user):
    spec = client.get("/openapi.json").json
    # the documented schema, with its components alongside so its $refs resolve
    validator = OAS31Validator({"$ref": "#/components/schemas/ErrorOut", "components": spec["components"]})
    headers = make_user("alice")
    bodies = [
        client.post("/call_model", json={"prompt": "hi"}).json,  # 401
        client.post("/call_model", json={"prompt": ""}, headers=headers).json,  # 400 with details
        client.post("/call_model", data="{not json", content_type="application/json", headers=headers).json,
        client.get("/async_call_status?job_id=6fde421b-5079-4c22-ad78-e65a6fefaaaf", headers=headers).json,  # 404
    ]
    for body in bodies:
        validator.validate(body)
    assert bodies[1]["error"]["details"]["prompt"]
    openai = OAS31Validator({"$ref": "#/components/schemas/OpenAIErrorOut", "components": spec["components"]})
    v1 = [
        client.get("/v1/models").json,  # 401
        client.post("/v1/chat/completions", json={"messages": []}, headers=headers).json,  # 400
        client.get("/v1/models", headers={"Authorization": "Bearer mk-not-a-key"}).json,  # 401
    ]
    for body in v1:
        openai.validate(body)


def test_whole_json_numbers_are_integers_as_documented(client, make_user):
    # schemathesis found this: JSON Schema calls 1.0 an integer, so the API must take it
    headers = make_user("alice")
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1.0, "seed": 3.0}, headers=headers)
    assert r.status_code == 201, r.json
    bad = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1.5}, headers=headers)
    assert bad.status_code == 400 and bad.json["error"]["details"]["max_tokens"]


def test_swagger_ui_is_served_from_local_files(client):
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/docs/assets/swagger-ui-bundle.js" in html and "/docs/assets/swagger-ui.css" in html
    assert "cdn.jsdelivr" not in html and "apiflask.com" not in html
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.data) > 100_000
    assert "javascript" in js.content_type
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert client.get("/docs/assets/../../app.py").status_code == 404
