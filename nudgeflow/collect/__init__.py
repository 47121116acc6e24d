"""`nudgeflow collect`: the HTTP collector trackers send to, in front of the input topic.

    calls.py      a request body -> one item per event, decided by the flow's decoder
    identify.py   Segment identify calls -> profile hash fields
    limits.py     the per-write-key rate limit
    producer.py   the idempotent producer; answers once Kafka holds a call's events
    app.py        the pure ASGI app: endpoints, auth, limits, CORS, health, metrics
    server.py     serving it (uvicorn + uvloop + httptools), and in a thread for tests
    static/tracker.js   the JavaScript tracker the collector serves at /tracker.js
"""
