"""The documented tasklane flow, driven with the openai-python client.

Usage (against `cargo run`):
    TASKLANE_BASE_URL=http://127.0.0.1:3000/v1 TASKLANE_API_KEY=<dev key> python examples/openai_flow.py

It submits a veo3 task exactly as the product document shows, polls it with that document's
loop (openai-python needs `cast_to=object` on `client.get` too), downloads the GIF before its
URL expires, uses /tasks/sync, cancels a queued task with curl, and receives a webhook.
The test suite runs this script against a fresh server.
"""

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.request

import openai

BASE_URL = os.environ.get("TASKLANE_BASE_URL", "http://127.0.0.1:3000/v1")
API_KEY = os.environ["TASKLANE_API_KEY"]

client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY)


def wait_for_task(client, task_id, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        result = client.get(f"/tasks/{task_id}", cast_to=object)
        status = result["status"]

        if status == "completed":
            return result["result"]
        elif status == "failed":
            raise Exception(f"Task failed: {result['error']['message']}")

        time.sleep(2)  # Poll every 2 seconds
    raise TimeoutError("Task timed out")


# Submitting a task
response = client.post(
    "/tasks",
    body={
        "model": "veo3",
        "action": "generate",
        "prompt": "A cat walking on the beach",
        "duration": 5,
    },
    cast_to=object,
)
task_id = response["task_id"]
print(f"Task submitted: {task_id}")
assert response["status"] == "queued", response

# Polling for status, then download promptly: result URLs expire.
result = wait_for_task(client, task_id)
output = result["outputs"][0]
with urllib.request.urlopen(output["url"]) as f:
    gif = f.read()
assert gif[:6] == b"GIF89a", gif[:6]
assert len(gif) == output["size_bytes"]
print(f"Downloaded {len(gif)} bytes of {output['content_type']}, URL valid until {output['expires_at']}")

# Synchronous wait mode: finished in time -> the task itself.
done = client.post("/tasks/sync", body={"model": "echo", "prompt": "hello"}, cast_to=object)
assert done["status"] == "completed", done
# Timeout exceeded -> a poll_url for continued polling.
slow = client.post(
    "/tasks/sync",
    body={"model": "veo3", "prompt": "a long video", "duration": 20, "timeout": 0.2},
    cast_to=object,
)
assert slow["status"] in ("queued", "processing"), slow
assert slow["poll_url"] == f"/v1/tasks/{slow['task_id']}", slow
print(f"Sync wait timed out as asked; poll {slow['poll_url']}")

# Cancelling a queued task with curl: credits come back.
account = client.get("/account", cast_to=object)
queued = [
    client.post("/tasks", body={"model": "veo3", "prompt": f"queue filler {i}", "duration": 20}, cast_to=object)
    for i in range(4)
]
last = queued[-1]
out = subprocess.run(
    ["curl", "-s", "-X", "POST", f"{BASE_URL}/tasks/{last['task_id']}/cancel", "-H", f"Authorization: Bearer {API_KEY}"],
    check=True,
    capture_output=True,
    text=True,
).stdout
cancelled = json.loads(out)
assert cancelled["status"] == "cancelled", cancelled
assert cancelled["cost"]["refunded"] is True
print(f"Cancelled {cancelled['task_id']}, {cancelled['cost']['credits']} credits refunded")

# Webhook callbacks: a receiver on loopback (allowed for local development).
received = []


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        received.append((dict(self.headers), json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=server.serve_forever, daemon=True).start()
hook_url = f"http://127.0.0.1:{server.server_address[1]}/webhook/task-done"
with_cb = client.post(
    "/tasks",
    body={"model": "echo", "action": "generate", "prompt": "...", "callback_url": hook_url},
    cast_to=object,
)
deadline = time.time() + 30
while not received and time.time() < deadline:
    time.sleep(0.1)
server.shutdown()
assert received, "no webhook arrived"
headers, event = received[0]
assert event["type"] == "task.completed", event
assert event["data"]["task_id"] == with_cb["task_id"]
assert headers["webhook-signature"].startswith("v1,")
print(f"Webhook {headers['webhook-id']} received: {event['type']}")
print("openai-python flow: OK")
