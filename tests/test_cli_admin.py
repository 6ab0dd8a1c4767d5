"""model-api: admins (create --admin, set-admin, bootstrap's first user) and the usage report."""

import csv
import io

from sqlalchemy import select

from model_api.models import AdminEvent, User

from .conftest import basic


def is_admin(database, name: str) -> bool:
    with database.session() as s:
        return s.scalar(select(User.is_admin).where(User.username == name))


def test_admins_are_made_and_unmade_and_each_change_is_audited(app, database):
    cli = app.test_cli_runner()
    r = cli.invoke(args=["users", "create", "op", "--password", "a long password", "--admin"])
    assert r.exit_code == 0 and "created admin op" in r.output
    assert cli.invoke(args=["users", "create", "cust", "--password", "a long password"]).exit_code == 0
    assert is_admin(database, "op") and not is_admin(database, "cust")
    assert cli.invoke(args=["users", "set-admin", "cust", "--on"]).exit_code == 0 and is_admin(database, "cust")
    assert cli.invoke(args=["users", "set-admin", "cust", "--off"]).exit_code == 0
    assert not is_admin(database, "cust")
    assert cli.invoke(args=["users", "set-admin", "cust"]).exit_code != 0  # --on or --off, never a guess
    assert "no user" in cli.invoke(args=["users", "set-admin", "nobody", "--on"]).output
    with database.session() as s:
        rows = list(s.scalars(select(AdminEvent).order_by(AdminEvent.id)))
    assert [(e.action, e.target, e.actor_id) for e in rows] == [
        ("user.create", "op", None), ("user.create", "cust", None),
        ("user.update", "cust", None), ("user.update", "cust", None)]


def test_bootstraps_first_user_is_an_admin(app, database):
    assert app.test_cli_runner().invoke(args=["bootstrap"]).exit_code == 0
    with database.session() as s:
        assert s.scalars(select(User)).one().is_admin


def test_usage_prints_the_report_as_a_table_and_as_csv(app, make_user):
    client, cli = app.test_client(), app.test_cli_runner()
    alice = make_user("alice", quota=5)
    for _ in range(2):
        assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=alice).status_code == 201
    api = client.get("/me/usage?group_by=day", headers=basic("alice")).json["totals"]

    table = cli.invoke(args=["usage", "--by", "user"])
    assert table.exit_code == 0, table.output
    assert "alice" in table.output and "TOTAL" in table.output
    rows = list(csv.DictReader(io.StringIO(cli.invoke(args=["usage", "--by", "day", "--csv"]).output)))
    assert len(rows) == 1 and int(rows[0]["calls"]) == api["calls"] == 2
    assert int(rows[0]["completion_tokens"]) == api["completion_tokens"]
    assert cli.invoke(args=["usage", "--since", "2999-01-01", "--csv"]).output.count("\n") == 1  # the header
    assert cli.invoke(args=["usage", "--by", "week"]).exit_code != 0
    assert cli.invoke(args=["usage", "--since", "yesterday"]).exit_code != 0
