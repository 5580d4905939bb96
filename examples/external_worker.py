#!/usr/bin/env python3
"""A Ward external worker in plain Python (standard library only).

Fetches and locks tasks of the handlers it serves (long-polling), runs them,
and completes or fails them over the external-task HTTP API. Extend HANDLERS
with your own functions.

    WARD_URL=http://127.0.0.1:8080 WARD_API_KEY=ward_... \
        python3 examples/external_worker.py --handler care-plan.open [--once]
"""
import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request


def open_care_plan(task):
    patient = (task["input"] or {}).get("patient", "unknown")
    return {"care_plan": f"plan-{patient}", "opened_by": "external_worker.py"}


HANDLERS = {"care-plan.open": open_care_plan}


def call(url, key, path, body):
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("WARD_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", default=os.environ.get("WARD_API_KEY"))
    parser.add_argument("--handler", action="append", default=[], help="handler to serve (repeatable)")
    parser.add_argument("--worker-id", default=f"py-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--lock-ms", type=int, default=30000)
    parser.add_argument("--wait-ms", type=int, default=20000)
    parser.add_argument("--once", action="store_true", help="handle one batch, then exit")
    args = parser.parse_args()
    if not args.api_key:
        sys.exit("external_worker.py: set WARD_API_KEY or pass --api-key")
    handlers = args.handler or list(HANDLERS)
    while True:
        fetched = call(args.url, args.api_key, "/v1/external-tasks/fetch-and-lock", {
            "worker_id": args.worker_id, "handlers": handlers, "max_tasks": 10,
            "lock_ms": args.lock_ms, "wait_ms": args.wait_ms,
        })
        for task in fetched["tasks"]:
            task_id = task["task_run_id"]
            try:
                output = HANDLERS[task["handler"]](task)
                call(args.url, args.api_key, f"/v1/external-tasks/{task_id}/complete",
                     {"worker_id": args.worker_id, "output": output})
                print(f"completed {task['handler']} {task_id}", flush=True)
            except urllib.error.HTTPError as error:
                print(f"ward refused {task_id}: {error.code} {error.read().decode()}", file=sys.stderr, flush=True)
            except Exception as error:  # the handler failed: report it, Ward retries by the step's policy
                call(args.url, args.api_key, f"/v1/external-tasks/{task_id}/fail",
                     {"worker_id": args.worker_id, "error": str(error), "retryable": True})
                print(f"failed {task['handler']} {task_id}: {error}", file=sys.stderr, flush=True)
        if args.once and fetched["tasks"]:
            return


if __name__ == "__main__":
    main()
