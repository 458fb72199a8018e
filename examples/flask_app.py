"""A Flask app with the synchronous client (needs `flask`).

flask --app examples.flask_app run      (with `python examples/worker.py` running)

One Client per process: threads may share it (each call takes a connection of its own).
"""

import os

from flask import Flask, jsonify, request

from clusterq import Client, TaskNotFound

app = Flask(__name__)
client = Client(
    os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000"),
    prefix=os.environ.get("CLUSTERQ_PREFIX", "clusterq"),
)


@app.post("/webhooks")
def send_webhook():  # type: ignore[no-untyped-def]
    url = (request.get_json(silent=True) or {}).get("url")
    if not isinstance(url, str):
        return jsonify(error="give a JSON body with a url"), 400
    info = client.enqueue("webhooks:deliver", {"url": url}, queue="webhooks", retention=300)
    return jsonify(task=info.id, state=info.state), 202


@app.get("/webhooks/<task_id>")
def webhook_state(task_id: str):  # type: ignore[no-untyped-def]
    try:
        info = client.info(task_id, queue="webhooks")
    except TaskNotFound:
        return jsonify(error=f"no task {task_id}"), 404
    return jsonify(task=info.id, state=info.state, retried=info.retried)
