"""Regenerate docs/dashboard.png from the job ``make cluster`` runs (``make screenshot``).

Runs ``lte-server`` with the command line given after ``--`` (the Makefile passes the cluster's
own flags), with ``--dashboard-port 0 --linger 600`` appended, waits until the job is done and the
server lingers on its final state, opens the dashboard in Debian's chromium through playwright,
saves a full-page screenshot, then stops the server with SIGINT (its Ctrl+C).

    python docs/screenshot.py docs/dashboard.png -- lte-server --model mlp ... --local-workers 3
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: screenshot.py OUT.png -- lte-server ARGS...", file=sys.stderr)
        return 2
    out, command = Path(argv[0]), argv[2:]
    command += ["--dashboard-port", "0", "--linger", "600", "--log-format", "json"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = None
    try:
        for line in server.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            url = record.get("url", url)
            if record.get("msg", "").startswith("job done; serving the final state"):
                break
        else:
            print("screenshot.py: the server ended before its job was done", file=sys.stderr)
            return 1
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector('#stat-state:text("done")', timeout=60_000)
            page.wait_for_selector('#chart-accuracy-version:not([data-points="0"])', state="attached")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
        print(f"screenshot.py: {out} from {url}", file=sys.stderr)
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
