"""Run the Postman collection with newman (pinned in postman/), as CI does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEWMAN = ROOT / "postman" / "node_modules" / ".bin" / "newman"
COLLECTION = ROOT / "postman" / "model-api.postman_collection.json"
ENVIRONMENT = ROOT / "postman" / "model-api.postman_environment.json"
# the main user's quota: enough for every model call of the collection before
# "Use up the quota" spends the rest (README "Testing with Postman")
MAIN_QUOTA = 8


def request_names() -> set[str]:
    return {item["name"] for folder in json.loads(COLLECTION.read_text())["item"] for item in folder["item"]}


def run_newman(base_url: str, main: tuple[str, str], other: tuple[str, str], api_key: str,
               report_dir: Path, timeout: float = 900) -> dict:
    """Run the whole collection; fail with newman's output on any failed assertion."""
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / "newman.json"
    r = subprocess.run(
        [str(NEWMAN), "run", str(COLLECTION), "-e", str(ENVIRONMENT),
         "--env-var", f"baseUrl={base_url}",
         "--env-var", f"username={main[0]}", "--env-var", f"password={main[1]}",
         "--env-var", f"otherUsername={other[0]}", "--env-var", f"otherPassword={other[1]}",
         "--env-var", f"apiKey={api_key}",
         "--env-var", "pollDelayMs=300", "--env-var", "pollLimit=200",
         "--reporters", "cli,json", "--reporter-json-export", str(report), "--color", "off"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, f"newman failed:\n{r.stdout[-8000:]}\n{r.stderr}"
    run = json.loads(report.read_text())["run"]
    assert run["stats"]["assertions"]["failed"] == 0 and run["failures"] == []
    # every request of the collection ran (none skipped by a broken setNextRequest chain)
    names = request_names()
    executed = {e["item"]["name"] for e in run["executions"]}
    assert executed == names, names - executed
    assert run["stats"]["assertions"]["total"] >= 3 * len(names)
    return run
